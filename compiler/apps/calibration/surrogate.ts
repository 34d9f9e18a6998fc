/**
 * Linear surrogates of MLP parts (SPEC.md, "MLP routed with a surrogate"): s(u) = (u . A) . B + c,
 * u being the MLP's normalised input, fitted so that a token the MLP skips gets s(u) in place of
 * its update m.
 *
 * Fit: ridge regression of all H outputs of m on u at once, from streamed sums (one Cholesky
 * factorisation, H right-hand sides), on standardised u as solveRidge does: m ~ W^T u + c. Rank
 * r: the top-r eigenvectors V_r of W^T Cov(u) W (the covariance of the fitted values), then
 * A = W V_r [H, r], B = V_r^T [r, H], c = mean(m) - mean(u) A B: the fitted values projected on
 * the r directions that carry most of their variance. It costs 2 H r multiply-accumulates per
 * token, so a low rank saves more per skipped token than the full map.
 */
import { mulberry32 } from '../../core/random.js';
import type { Surrogate } from '../../routing/router-weights.js';

/** Sums of (u, m) pairs over the tokens seen so far: n, sum u, sum u u^T, sum u m^T, sum m, sum |m|^2. */
export class SurrogateStats {
  n = 0;
  readonly sumU: Float64Array;
  /** Upper triangle (row-major, j >= i) of sum u u^T. */
  readonly gram: Float64Array;
  /** sum u_i m_j, row-major [H_in, H_out]. */
  readonly cross: Float64Array;
  readonly sumM: Float64Array;
  sumMM = 0;

  constructor(readonly dim: number) {
    this.sumU = new Float64Array(dim);
    this.gram = new Float64Array(dim * dim);
    this.cross = new Float64Array(dim * dim);
    this.sumM = new Float64Array(dim);
  }

  /** Adds the rows `rows` (token indices) of u and of the target m, both [tokens, dim] row-major. */
  add(u: ArrayLike<number>, m: ArrayLike<number>, rows: ArrayLike<number>): void {
    const d = this.dim;
    const { gram, cross, sumU, sumM } = this;
    const ur = new Float64Array(d);
    const mr = new Float64Array(d);
    for (let r = 0; r < rows.length; r++) {
      const base = rows[r]! * d;
      for (let i = 0; i < d; i++) {
        ur[i] = u[base + i]!;
        mr[i] = m[base + i]!;
      }
      for (let i = 0; i < d; i++) {
        const ui = ur[i]!;
        sumU[i] += ui;
        sumM[i] += mr[i]!;
        this.sumMM += mr[i]! * mr[i]!;
        const g = i * d;
        for (let j = i; j < d; j++) gram[g + j] += ui * ur[j]!;
        for (let j = 0; j < d; j++) cross[g + j] += ui * mr[j]!;
      }
    }
    this.n += rows.length;
  }
}

export interface FittedSurrogate extends Surrogate {
  /** Fraction of the variance of m (summed over outputs) that s(u) explains on the fitted data. */
  r2: number;
}

/** Ridge fit of m on u at rank `rank` (at most H); lambda penalises the standardised weights. */
export function fitSurrogate(s: SurrogateStats, lambda: number, rank: number): FittedSurrogate {
  return fitSurrogates(s, lambda, [rank])[0]!;
}

/** fitSurrogate at several ranks: one ridge solve and one eigen-decomposition for all of them. */
export function fitSurrogates(s: SurrogateStats, lambda: number, ranks: readonly number[]): FittedSurrogate[] {
  const d = s.dim;
  const n = s.n;
  if (n < 2) throw new Error('surrogate: fewer than two samples');
  const rMax = Math.max(1, Math.min(Math.max(...ranks), d));
  const meanU = Float64Array.from(s.sumU, (v) => v / n);
  const meanM = Float64Array.from(s.sumM, (v) => v / n);
  const cov = new Float64Array(d * d);
  for (let i = 0; i < d; i++)
    for (let j = i; j < d; j++) {
      const c = s.gram[i * d + j]! / n - meanU[i]! * meanU[j]!;
      cov[i * d + j] = c;
      cov[j * d + i] = c;
    }
  const cum = new Float64Array(d * d); // Cov(u, m) [in, out]
  for (let i = 0; i < d; i++) for (let j = 0; j < d; j++) cum[i * d + j] = s.cross[i * d + j]! / n - meanU[i]! * meanM[j]!;
  const sd = Float64Array.from({ length: d }, (_, i) => Math.sqrt(Math.max(cov[i * d + i]!, 0)) || 1);
  const a = new Float64Array(d * d);
  for (let i = 0; i < d; i++) {
    for (let j = 0; j < d; j++) a[i * d + j] = cov[i * d + j]! / (sd[i]! * sd[j]!);
    a[i * d + i] += lambda;
  }
  const L = cholesky(a, d);
  // W [in, out]: column j solves (C_z + lambda I) w_z = Cov(u, m_j) / sd, then w = w_z / sd.
  const W = new Float64Array(d * d);
  const rhs = new Float64Array(d);
  for (let j = 0; j < d; j++) {
    for (let i = 0; i < d; i++) rhs[i] = cum[i * d + j]! / sd[i]!;
    const wz = choleskyBack(L, rhs, d);
    for (let i = 0; i < d; i++) W[i * d + j] = wz[i]! / sd[i]!;
  }
  // Covariance of the fitted values: W^T C W [out, out].
  const CW = matmul(cov, W, d, d, d);
  const F = matmulTN(W, CW, d, d, d);
  const Vmax = topEigenvectors(F, d, rMax); // [d, rMax]
  let varM = s.sumMM / n;
  for (let j = 0; j < d; j++) varM -= meanM[j]! ** 2;
  return ranks.map((rank) => {
    const r = Math.max(1, Math.min(rank, d));
    const V = new Float64Array(d * r);
    for (let i = 0; i < d; i++) for (let k = 0; k < r; k++) V[i * r + k] = Vmax[i * rMax + k]!;
    return reduced(W, V, r, cov, cum, meanU, meanM, varM, d);
  });
}

/** The rank-r surrogate W V V^T of the full fit W, with its bias and explained variance. */
function reduced(
  W: Float64Array,
  V: Float64Array,
  r: number,
  cov: Float64Array,
  cum: Float64Array,
  meanU: Float64Array,
  meanM: Float64Array,
  varM: number,
  d: number,
): FittedSurrogate {
  const A = matmul(W, V, d, d, r); // [d, r]
  const P = matmulNT(A, V, d, r, d); // A B = W V V^T [in, out]
  const bias = new Float64Array(d);
  for (let j = 0; j < d; j++) {
    let v = meanM[j]!;
    for (let i = 0; i < d; i++) v -= meanU[i]! * P[i * d + j]!;
    bias[j] = v;
  }
  // Explained variance: 1 - E|m - s|^2 / E|m - mean m|^2 (both centred: s is unbiased on the fitted data).
  const CP = matmul(cov, P, d, d, d);
  let cross = 0;
  let predVar = 0;
  for (let k = 0; k < d * d; k++) {
    cross += P[k]! * cum[k]!;
    predVar += P[k]! * CP[k]!;
  }
  const residual = varM - 2 * cross + predVar;
  const B = new Float32Array(r * d);
  for (let k = 0; k < r; k++) for (let j = 0; j < d; j++) B[k * d + j] = V[j * r + k]!;
  return { rank: r, a: Float32Array.from(A), b: B, bias: Float32Array.from(bias), r2: varM > 0 ? 1 - residual / varM : 0 };
}

/** s(u) for the rows `rows` of u ([tokens, H]), written to out[k * H ...] for the k-th listed row. */
export function applySurrogate(s: Surrogate, u: ArrayLike<number>, rows: ArrayLike<number>, H: number): Float32Array {
  const out = new Float32Array(rows.length * H);
  const t = new Float64Array(s.rank);
  for (let k = 0; k < rows.length; k++) {
    const base = rows[k]! * H;
    t.fill(0);
    for (let i = 0; i < H; i++) {
      const ui = u[base + i]!;
      const row = i * s.rank;
      for (let q = 0; q < s.rank; q++) t[q] += ui * s.a[row + q]!;
    }
    const o = k * H;
    for (let j = 0; j < H; j++) out[o + j] = s.bias[j]!;
    for (let q = 0; q < s.rank; q++) {
      const tq = t[q]!;
      const row = q * H;
      for (let j = 0; j < H; j++) out[o + j] += tq * s.b[row + j]!;
    }
  }
  return out;
}

/** Surrogate ranks for an MLP of `mlpMacs` MACs per token: about 5% and 10% of its MACs (2 H r = f C). */
export function defaultRanks(mlpMacs: number, H: number): number[] {
  const ranks = [0.05, 0.1].map((f) => Math.max(1, Math.min(H, Math.round((f * mlpMacs) / (2 * H) / 8) * 8 || 1)));
  return [...new Set(ranks)];
}

/**
 * The `k` eigenvectors of the symmetric positive semi-definite matrix `m` (d x d, row-major)
 * with the largest eigenvalues, as the columns of a [d, k] row-major matrix: cyclic Jacobi
 * rotations for d <= 256, subspace iteration (then Jacobi on the k x k projection) above.
 */
export function topEigenvectors(m: Float64Array, d: number, k: number): Float64Array {
  if (d > 256 && k < d / 2) return subspaceEigenvectors(m, d, k);
  return jacobiEigenvectors(m, d, k);
}

/** Block power iteration with orthonormalisation, then Rayleigh-Ritz to order the k directions. */
function subspaceEigenvectors(m: Float64Array, d: number, k: number): Float64Array {
  const p = Math.min(d, k + 8);
  let q: Float64Array = new Float64Array(d * p);
  const next = mulberry32(1);
  for (let i = 0; i < q.length; i++) q[i] = next() - 0.5;
  orthonormalise(q, d, p);
  for (let it = 0; it < 200; it++) {
    const z = matmul(m, q, d, d, p);
    orthonormalise(z, d, p);
    let change = 0;
    for (let c = 0; c < p; c++) {
      let dot = 0;
      for (let i = 0; i < d; i++) dot += z[i * p + c]! * q[i * p + c]!;
      change = Math.max(change, 1 - Math.abs(dot));
    }
    q = z;
    if (change < 1e-12) break;
  }
  // Rayleigh-Ritz: T = Q^T M Q (p x p), its eigenvectors rotate Q.
  const mq = matmul(m, q, d, d, p);
  const t = matmulTN(q, mq, d, p, p);
  const e = jacobiEigenvectors(t, p, k);
  return matmul(q, e, d, p, k);
}

/** Modified Gram-Schmidt on the columns of a [d, p] row-major matrix, in place. */
function orthonormalise(a: Float64Array, d: number, p: number): void {
  for (let c = 0; c < p; c++) {
    for (let prev = 0; prev < c; prev++) {
      let dot = 0;
      for (let i = 0; i < d; i++) dot += a[i * p + c]! * a[i * p + prev]!;
      for (let i = 0; i < d; i++) a[i * p + c] -= dot * a[i * p + prev]!;
    }
    let norm = 0;
    for (let i = 0; i < d; i++) norm += a[i * p + c]! ** 2;
    norm = Math.sqrt(norm) || 1;
    for (let i = 0; i < d; i++) a[i * p + c] /= norm;
  }
}

function jacobiEigenvectors(m: Float64Array, d: number, k: number): Float64Array {
  const a = Float64Array.from(m);
  const v = new Float64Array(d * d);
  for (let i = 0; i < d; i++) v[i * d + i] = 1;
  let scale = 0;
  for (let i = 0; i < d * d; i++) scale += a[i]! * a[i]!;
  for (let sweep = 0; sweep < 60; sweep++) {
    let off = 0;
    for (let p = 0; p < d; p++) for (let q = p + 1; q < d; q++) off += a[p * d + q]! ** 2;
    if (off <= 1e-24 * scale || off === 0) break;
    for (let p = 0; p < d; p++) {
      for (let q = p + 1; q < d; q++) {
        const apq = a[p * d + q]!;
        if (Math.abs(apq) < 1e-300) continue;
        const app = a[p * d + p]!;
        const aqq = a[q * d + q]!;
        const theta = (aqq - app) / (2 * apq);
        const t = Math.sign(theta || 1) / (Math.abs(theta) + Math.sqrt(theta * theta + 1));
        const c = 1 / Math.sqrt(t * t + 1);
        const s = t * c;
        for (let i = 0; i < d; i++) {
          const aip = a[i * d + p]!;
          const aiq = a[i * d + q]!;
          a[i * d + p] = c * aip - s * aiq;
          a[i * d + q] = s * aip + c * aiq;
        }
        for (let i = 0; i < d; i++) {
          const api = a[p * d + i]!;
          const aqi = a[q * d + i]!;
          a[p * d + i] = c * api - s * aqi;
          a[q * d + i] = s * api + c * aqi;
        }
        for (let i = 0; i < d; i++) {
          const vip = v[i * d + p]!;
          const viq = v[i * d + q]!;
          v[i * d + p] = c * vip - s * viq;
          v[i * d + q] = s * vip + c * viq;
        }
      }
    }
  }
  const order = Array.from({ length: d }, (_, i) => i).sort((x, y) => a[y * d + y]! - a[x * d + x]!);
  const out = new Float64Array(d * k);
  for (let c = 0; c < k; c++) for (let i = 0; i < d; i++) out[i * k + c] = v[i * d + order[c]!]!;
  return out;
}

/** Lower Cholesky factor of a symmetric positive definite matrix (row-major). */
function cholesky(a: Float64Array, d: number): Float64Array {
  const L = new Float64Array(d * d);
  for (let j = 0; j < d; j++) {
    let diag = a[j * d + j]!;
    for (let k = 0; k < j; k++) diag -= L[j * d + k]! ** 2;
    if (!(diag > 0)) throw new Error(`surrogate: matrix not positive definite at column ${j}`);
    const l = Math.sqrt(diag);
    L[j * d + j] = l;
    for (let i = j + 1; i < d; i++) {
      let v = a[i * d + j]!;
      for (let k = 0; k < j; k++) v -= L[i * d + k]! * L[j * d + k]!;
      L[i * d + j] = v / l;
    }
  }
  return L;
}

function choleskyBack(L: Float64Array, b: Float64Array, d: number): Float64Array {
  const y = new Float64Array(d);
  for (let i = 0; i < d; i++) {
    let v = b[i]!;
    for (let k = 0; k < i; k++) v -= L[i * d + k]! * y[k]!;
    y[i] = v / L[i * d + i]!;
  }
  const x = new Float64Array(d);
  for (let i = d - 1; i >= 0; i--) {
    let v = y[i]!;
    for (let k = i + 1; k < d; k++) v -= L[k * d + i]! * x[k]!;
    x[i] = v / L[i * d + i]!;
  }
  return x;
}

/** [m, k] x [k, n]. */
function matmul(a: Float64Array, b: Float64Array, m: number, k: number, n: number): Float64Array {
  const out = new Float64Array(m * n);
  for (let i = 0; i < m; i++)
    for (let p = 0; p < k; p++) {
      const aip = a[i * k + p]!;
      if (aip === 0) continue;
      for (let j = 0; j < n; j++) out[i * n + j] += aip * b[p * n + j]!;
    }
  return out;
}

/** a^T b with a [k, m], b [k, n]. */
function matmulTN(a: Float64Array, b: Float64Array, k: number, m: number, n: number): Float64Array {
  const out = new Float64Array(m * n);
  for (let p = 0; p < k; p++)
    for (let i = 0; i < m; i++) {
      const api = a[p * m + i]!;
      for (let j = 0; j < n; j++) out[i * n + j] += api * b[p * n + j]!;
    }
  return out;
}

/** a b^T with a [m, k], b [n, k]. */
function matmulNT(a: Float64Array, b: Float64Array, m: number, k: number, n: number): Float64Array {
  const out = new Float64Array(m * n);
  for (let i = 0; i < m; i++)
    for (let j = 0; j < n; j++) {
      let v = 0;
      for (let p = 0; p < k; p++) v += a[i * k + p]! * b[j * k + p]!;
      out[i * n + j] = v;
    }
  return out;
}
