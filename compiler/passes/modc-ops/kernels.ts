/**
 * Reference kernels for the modc ops, straight from SPEC.md, on flat row-major arrays. The ONNX
 * function bodies are tested against these, and the MoD reference executor uses them.
 */

/** score[b,s] = sum_h x[b,s,h] * w[h] + bias, in float32. */
export function router(x: Float32Array, [B, S, H]: number[], w: Float32Array, bias: number): Float32Array {
  const out = new Float32Array(B! * S!);
  for (let t = 0; t < B! * S!; t++) {
    let acc = 0;
    for (let h = 0; h < H!; h++) acc += x[t * H! + h]! * w[h]!;
    out[t] = acc + bias;
  }
  return out;
}

export function sigmoid(s: number): number {
  return 1 / (1 + Math.exp(-s));
}

/**
 * The least float32 score s whose float32 sigmoid is at least p (fround(sigmoid(s)) >=
 * fround(p)): since that test only ever turns on as s grows, `sigmoid(s) >= p` is `s >= cut`.
 * -Infinity for p <= 0 (every score), +Infinity when no finite score reaches p.
 */
export function scoreCut(p: number): number {
  const target = Math.fround(p);
  const passes = (s: number) => Math.fround(sigmoid(s)) >= target;
  if (passes(-Infinity)) return -Infinity;
  if (!passes(Math.fround(3.4028234663852886e38))) return Infinity;
  // Binary search over float32 values in order: their bit patterns, sign-flipped, sort as uint32.
  const bits = new Uint32Array(1);
  const f = new Float32Array(bits.buffer);
  const key = (v: number) => {
    f[0] = v;
    return bits[0]! & 0x80000000 ? ~bits[0]! >>> 0 : (bits[0]! | 0x80000000) >>> 0;
  };
  const value = (k: number) => {
    bits[0] = k & 0x80000000 ? (k & 0x7fffffff) >>> 0 : ~k >>> 0;
    return f[0]!;
  };
  let lo = key(-Infinity); // fails
  let hi = key(Math.fround(3.4028234663852886e38)); // passes
  while (hi - lo > 1) {
    const mid = lo + Math.floor((hi - lo) / 2);
    if (passes(value(mid))) hi = mid;
    else lo = mid;
  }
  return value(hi);
}

/** selected = sigmoid(score) >= p and not padding. */
export function selectThreshold(score: Float32Array, mask: ArrayLike<number>, p: number): Uint8Array {
  return Uint8Array.from(score, (s, i) => (mask[i] && Math.fround(sigmoid(s)) >= Math.fround(p) ? 1 : 0));
}

/**
 * Per row: the ceil(c * n) highest scores among the n real tokens, ties to the earlier token
 * (ceil of the float32 product, as the graph computes it). One-token steps with a past use
 * sigmoid(score) >= 0.5.
 */
export function selectTopK(score: Float32Array, mask: ArrayLike<number>, [B, S]: number[], capacity: number, pastLength: number): Uint8Array {
  if (S === 1 && pastLength > 0) return selectThreshold(score, mask, 0.5);
  const out = new Uint8Array(B! * S!);
  for (let b = 0; b < B!; b++) {
    const real: number[] = [];
    for (let s = 0; s < S!; s++) if (mask[b * S! + s]) real.push(s);
    const k = Math.ceil(Math.fround(Math.fround(capacity) * real.length));
    real.sort((i, j) => score[b * S! + j]! - score[b * S! + i]! || i - j);
    for (const s of real.slice(0, k)) out[b * S! + s] = 1;
  }
  return out;
}

export interface Compacted {
  /** K slots per row: selected positions ascending, then unselected ones (invalid). */
  indices: number[];
  valid: Uint8Array;
  count: number[];
  K: number;
}

export function compact(selected: ArrayLike<number>, [B, S]: number[]): Compacted {
  const count: number[] = [];
  for (let b = 0; b < B!; b++) {
    let c = 0;
    for (let s = 0; s < S!; s++) c += selected[b * S! + s] ? 1 : 0;
    count.push(c);
  }
  const K = Math.max(1, ...count);
  const indices: number[] = [];
  const valid = new Uint8Array(B! * K);
  for (let b = 0; b < B!; b++) {
    const chosen: number[] = [];
    const rest: number[] = [];
    for (let s = 0; s < S!; s++) (selected[b * S! + s] ? chosen : rest).push(s);
    const row = [...chosen, ...rest].slice(0, K);
    row.forEach((s, k) => {
      indices.push(s);
      valid[b * K + k] = k < chosen.length ? 1 : 0;
    });
  }
  return { indices, valid, count, K };
}

/** y[b,k,...] = x[b, indices[b,k], ...]; `inner` is the product of the dims after the first two. */
export function gatherTokens<T extends Float32Array | Float64Array | BigInt64Array | Uint8Array>(
  x: T,
  [B, S]: number[],
  inner: number,
  indices: number[],
  K: number,
): T {
  const Ctor = x.constructor as new (n: number) => T;
  const out = new Ctor(B! * K * inner);
  for (let b = 0; b < B!; b++) {
    for (let k = 0; k < K; k++) {
      const src = (b * S! + indices[b * K + k]!) * inner;
      out.set(x.subarray(src, src + inner) as never, (b * K + k) * inner);
    }
  }
  return out;
}

/** x with each valid slot's token replaced by y (or x_sel + gate * (y - x_sel) when gated). */
export function scatterTokens(
  x: Float32Array,
  [B, S, H]: number[],
  indices: number[],
  valid: Uint8Array,
  K: number,
  y: Float32Array,
  gate?: Float32Array,
): Float32Array {
  const out = Float32Array.from(x);
  for (let b = 0; b < B!; b++) {
    for (let k = 0; k < K; k++) {
      if (!valid[b * K + k]) continue;
      const dst = (b * S! + indices[b * K + k]!) * H!;
      const src = (b * K + k) * H!;
      for (let h = 0; h < H!; h++) {
        const xv = x[dst + h]!;
        const yv = y[src + h]!;
        out[dst + h] = gate ? Math.fround(xv + Math.fround(Math.fround(gate[b * K + k]!) * Math.fround(yv - xv))) : yv;
      }
    }
  }
  return out;
}

/** out[b,h,i,j] = mask[b|0, h, qIdx[b,i], kIdx[b,j]] where kValid[b,j], else fill. */
export function gatherMask(
  mask: Float32Array,
  [MB, Hm, Sq, T]: number[],
  B: number,
  qIdx: number[],
  K: number,
  kIdx: number[],
  K2: number,
  kValid: Uint8Array,
  fill: number,
): Float32Array {
  const out = new Float32Array(B * Hm! * K * K2);
  for (let b = 0; b < B; b++) {
    const mb = MB === 1 ? 0 : b;
    for (let h = 0; h < Hm!; h++) {
      for (let i = 0; i < K; i++) {
        for (let j = 0; j < K2; j++) {
          const o = ((b * Hm! + h) * K + i) * K2 + j;
          out[o] = kValid[b * K2 + j] ? mask[((mb * Hm! + h) * Sq! + qIdx[b * K + i]!) * T! + kIdx[b * K2 + j]!]! : fill;
        }
      }
    }
  }
  return out;
}

/** mask[b, j] = j < lengths[b]. */
export function prefixMask(lengths: number[], total: number): Uint8Array {
  const out = new Uint8Array(lengths.length * total);
  lengths.forEach((len, b) => {
    for (let j = 0; j < total; j++) out[b * total + j] = j < len ? 1 : 0;
  });
  return out;
}

/** Key slot t of row b: its valid cache slots, this call's K positions, then the rest of its cache. */
export function slotPositions(past: number[], [B, P]: number[], pastLength: number[], positions: number[], K: number): number[] {
  const out: number[] = [];
  for (let b = 0; b < B; b++) {
    const len = pastLength[b]!;
    for (let t = 0; t < P + K; t++) {
      out.push(t < len ? past[b * P + t]! : t < len + K ? positions[b * K + t - len]! : past[b * P + t - K]!);
    }
  }
  return out;
}

/** bias[b, 0, i, j] = 0 where q - window < k <= q (q, k the query's and key's positions), else `lowest`. */
export function windowBias(queryPositions: number[], keyPositions: number[], [B, K, T]: number[], window: number, lowest: number): Float32Array {
  const out = new Float32Array(B * K * T);
  for (let b = 0; b < B; b++)
    for (let i = 0; i < K; i++)
      for (let j = 0; j < T; j++) {
        const q = queryPositions[b * K + i]!;
        const k = keyPositions[b * T + j]!;
        out[(b * K + i) * T + j] = q - window < k && k <= q ? 0 : lowest;
      }
  return out;
}

/** A layer's valid keys: cache slots j < pastLength[b], then this call's valid slots. */
export function keyMask(pastLength: number[], capacity: number, valid: Uint8Array, K: number): Uint8Array {
  const B = pastLength.length;
  const out = new Uint8Array(B * (capacity + K));
  for (let b = 0; b < B; b++) {
    for (let j = 0; j < capacity; j++) out[b * (capacity + K) + j] = j < pastLength[b]! ? 1 : 0;
    for (let k = 0; k < K; k++) out[b * (capacity + K) + capacity + k] = valid[b * K + k]!;
  }
  return out;
}

/** out[.., b, h, k, d] = kv[.., b, h, indices[b, k], d] for dims [lead?, B, H, T, D]. */
export function gatherKv(kv: Float32Array, dims: number[], indices: number[], K: number): Float32Array {
  const [lead, B, H, T, D] = dims.length === 5 ? dims : [1, ...dims];
  const out = new Float32Array(lead! * B! * H! * K * D!);
  for (let i = 0; i < lead!; i++)
    for (let b = 0; b < B!; b++)
      for (let h = 0; h < H!; h++)
        for (let k = 0; k < K; k++) {
          const src = (((i * B! + b) * H! + h) * T! + indices[b * K + k]!) * D!;
          const dst = (((i * B! + b) * H! + h) * K + k) * D!;
          out.set(kv.subarray(src, src + D!), dst);
        }
  return out;
}

/** Key/value routing's entry codes: -1 - p for a token held for good (kept, or one of the first `sinks`), else p. */
export function kvCodes(positions: number[], keep: ArrayLike<number | boolean>, sinks: number): number[] {
  return positions.map((p, i) => (keep[i] || p < sinks ? -1 - p : p));
}

/** visible[b, 0, i, j]: entry j (by its code) is a key for the query at position q[b, i]. */
export function kvVisible(queryPositions: number[], codes: number[], [B, S, T]: number[], window: number): Uint8Array {
  const out = new Uint8Array(B * S * T);
  for (let b = 0; b < B; b++)
    for (let i = 0; i < S; i++)
      for (let j = 0; j < T; j++) {
        const c = codes[b * T + j]!;
        out[(b * S + i) * T + j] = c < 0 || queryPositions[b * S + i]! - c < window ? 1 : 0;
      }
  return out;
}

/** retain[b, j]: a valid entry held for good, or one of the `window` latest positions up to the row's last. */
export function kvRetain(codes: number[], valid: ArrayLike<number | boolean>, last: number[], [B, T]: number[], window: number): Uint8Array {
  const out = new Uint8Array(B * T);
  for (let b = 0; b < B; b++)
    for (let j = 0; j < T; j++) {
      const c = codes[b * T + j]!;
      out[b * T + j] = valid[b * T + j] && (c < 0 || c > last[b]! - window) ? 1 : 0;
    }
  return out;
}
