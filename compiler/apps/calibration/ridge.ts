/**
 * Closed-form ridge regression from streamed sufficient statistics: a router is fitted on
 * sums (n, sum x, sum x x^T, sum x t, sum t, sum t^2) accumulated batch by batch, so no
 * activation is kept beyond the batch that produced it.
 */

/** Sums of one regression target over the tokens seen so far. */
export class TargetSums {
  readonly sumXT: Float64Array;
  sumT = 0;
  sumTT = 0;
  minT = Infinity;
  maxT = -Infinity;
  constructor(dim: number) {
    this.sumXT = new Float64Array(dim);
  }
}

/**
 * The sufficient statistics of linear fits t_k ~ w_k . x + b_k of several targets on one input
 * (the Gram matrix is shared: the whole-block and attention routers of a layer read the same x).
 */
export class RidgeStats {
  n = 0;
  readonly sumX: Float64Array;
  /** Upper triangle (row-major, j >= i) of sum x x^T; mirrored when solving. */
  readonly gram: Float64Array;
  readonly targets: TargetSums[];

  constructor(
    readonly dim: number,
    targets = 1,
  ) {
    this.sumX = new Float64Array(dim);
    this.gram = new Float64Array(dim * dim);
    this.targets = Array.from({ length: targets }, () => new TargetSums(dim));
  }

  /** Bytes held by one accumulator of this dimension. */
  static bytes(dim: number, targets = 1): number {
    return 8 * (dim * dim + dim + targets * dim);
  }

  /**
   * Adds the rows `rows` (token indices) of `x` ([tokens, dim] row-major) with the targets
   * `t[k]` (one value per listed row). Only the upper triangle of the Gram matrix is updated.
   */
  add(x: Float32Array, rows: ArrayLike<number>, t: readonly ArrayLike<number>[]): void {
    const d = this.dim;
    const { gram, sumX } = this;
    const row = new Float64Array(d);
    for (let r = 0; r < rows.length; r++) {
      const base = rows[r]! * d;
      for (let i = 0; i < d; i++) row[i] = x[base + i]!;
      for (let i = 0; i < d; i++) {
        const xi = row[i]!;
        sumX[i] += xi;
        const g = i * d;
        for (let j = i; j < d; j++) gram[g + j] += xi * row[j]!;
      }
      this.targets.forEach((ts, k) => {
        const tv = t[k]![r]!;
        const sxt = ts.sumXT;
        for (let i = 0; i < d; i++) sxt[i] += row[i]! * tv;
        ts.sumT += tv;
        ts.sumTT += tv * tv;
        if (tv < ts.minT) ts.minT = tv;
        if (tv > ts.maxT) ts.maxT = tv;
      });
    }
    this.n += rows.length;
  }

  meanT(k = 0): number {
    return this.targets[k]!.sumT / this.n;
  }

  stdT(k = 0): number {
    return Math.sqrt(Math.max(0, this.targets[k]!.sumTT / this.n - this.meanT(k) ** 2));
  }
}

export interface RidgeFit {
  weight: Float64Array;
  bias: number;
  /** Fraction of the target's variance the fit explains on the data it was fitted on. */
  r2: number;
  /** Standard deviation of the fitted values w . x + b on that data. */
  predictionStd: number;
}

/**
 * Ridge regression on standardised inputs: minimises
 *   mean (t - w.x - b)^2 + lambda * sum_i (w_i sigma_i)^2
 * i.e. the penalty is on the weights of the standardised features, so lambda is scale-free.
 */
export function solveRidge(s: RidgeStats, lambda: number, target = 0): RidgeFit {
  const d = s.dim;
  const n = s.n;
  const ts = s.targets[target]!;
  if (n < 2) throw new Error('ridge: fewer than two samples');
  const mean = Float64Array.from(s.sumX, (v) => v / n);
  const meanT = ts.sumT / n;
  // Covariance of x and cross-covariance with t.
  const cov = new Float64Array(d * d);
  for (let i = 0; i < d; i++) {
    for (let j = i; j < d; j++) {
      const c = s.gram[i * d + j]! / n - mean[i]! * mean[j]!;
      cov[i * d + j] = c;
      cov[j * d + i] = c;
    }
  }
  const sd = Float64Array.from({ length: d }, (_, i) => Math.sqrt(Math.max(cov[i * d + i]!, 0)) || 1);
  // Standardised system: (C_z + lambda I) w_z = c_z.
  const a = new Float64Array(d * d);
  const rhs = new Float64Array(d);
  for (let i = 0; i < d; i++) {
    for (let j = 0; j < d; j++) a[i * d + j] = cov[i * d + j]! / (sd[i]! * sd[j]!);
    a[i * d + i] += lambda;
    rhs[i] = (ts.sumXT[i]! / n - mean[i]! * meanT) / sd[i]!;
  }
  const wz = choleskySolve(a, rhs, d);
  const weight = Float64Array.from(wz, (v, i) => v / sd[i]!);
  let bias = meanT;
  for (let i = 0; i < d; i++) bias -= weight[i]! * mean[i]!;
  // Variance of the prediction w^T C w; explained variance = 1 - residual / var(t).
  let predVar = 0;
  let cross = 0;
  for (let i = 0; i < d; i++) {
    let ci = 0;
    for (let j = 0; j < d; j++) ci += cov[i * d + j]! * weight[j]!;
    predVar += weight[i]! * ci;
    cross += weight[i]! * (ts.sumXT[i]! / n - mean[i]! * meanT);
  }
  const varT = ts.sumTT / n - meanT * meanT;
  const residual = varT - 2 * cross + predVar;
  return { weight, bias, r2: varT > 0 ? 1 - residual / varT : 0, predictionStd: Math.sqrt(Math.max(predVar, 0)) };
}

/** Solves A x = b for a symmetric positive definite A (row-major, d x d); A is overwritten. */
export function choleskySolve(a: Float64Array, b: Float64Array, d: number): Float64Array {
  for (let j = 0; j < d; j++) {
    let diag = a[j * d + j]!;
    for (let k = 0; k < j; k++) diag -= a[j * d + k]! ** 2;
    if (!(diag > 0)) throw new Error(`ridge: matrix not positive definite at column ${j}`);
    const l = Math.sqrt(diag);
    a[j * d + j] = l;
    for (let i = j + 1; i < d; i++) {
      let v = a[i * d + j]!;
      const ri = i * d;
      const rj = j * d;
      for (let k = 0; k < j; k++) v -= a[ri + k]! * a[rj + k]!;
      a[ri + j] = v / l;
    }
  }
  const y = new Float64Array(d);
  for (let i = 0; i < d; i++) {
    let v = b[i]!;
    for (let k = 0; k < i; k++) v -= a[i * d + k]! * y[k]!;
    y[i] = v / a[i * d + i]!;
  }
  const x = new Float64Array(d);
  for (let i = d - 1; i >= 0; i--) {
    let v = y[i]!;
    for (let k = i + 1; k < d; k++) v -= a[k * d + i]! * x[k]!;
    x[i] = v / a[i * d + i]!;
  }
  return x;
}

/**
 * A threshold that keeps the values at or above it, about a fraction `keep` of them, and that
 * equals none of them: halfway between the highest value dropped and the lowest kept (the next
 * distinct value when they tie). A threshold equal to a token's score would leave that token's
 * selection to float rounding, which the compiled model and the reference can resolve differently.
 */
export function thresholdKeeping(values: Float32Array | Float64Array, keep: number): number {
  const sorted = Float64Array.from(values).sort();
  const n = sorted.length;
  if (n === 0) return 0;
  const drop = Math.min(Math.max(Math.round((1 - keep) * n), 0), n);
  if (drop === 0) return sorted[0]! - 1;
  if (drop === n) return sorted[n - 1]! + 1;
  const lo = sorted[drop - 1]!;
  let up = drop;
  while (up < n && sorted[up] === lo) up++;
  if (up < n) return (lo + sorted[up]!) / 2;
  let down = drop - 1;
  while (down >= 0 && sorted[down] === lo) down--;
  return down >= 0 ? (sorted[down]! + lo) / 2 : lo - 1;
}
