/**
 * Compaction of a routed layer's KV cache between calls (docs/interface.md, "Compiled model
 * interface"). A routed layer appends K slots per row and call; a row that selected fewer than K
 * tokens leaves slots that hold none ("holes", only at batch > 1), and a GroupQueryAttention
 * layer's present can run past its longest row. Neither is wrong, only wasteful: compaction
 * moves each row's valid slots to its front, in order, and cuts the cache to the longest row.
 *
 * `slotsOf` says which slots hold a token; `compactTensor` rewrites one cache tensor
 * ([B, H, T, D], or [2, B, H, T, D] combined) keeping, per row, the listed slots.
 */
import { ort } from './ort.js';

/** Per row, the slots that hold a token, ascending. */
export type RowSlots = number[][];

/** The slots of a per-slot validity mask (bool [B, T]). */
export function validSlots(valid: ort.Tensor): RowSlots {
  const [B, T] = valid.dims as [number, number];
  const d = valid.data as Uint8Array;
  return Array.from({ length: B }, (_, b) => {
    const out: number[] = [];
    for (let t = 0; t < T; t++) if (d[b * T + t]) out.push(t);
    return out;
  });
}

/** Per row, how many slots of a validity mask (bool [B, T]) hold a token. */
export function validCounts(valid: ort.Tensor): number[] {
  const [B, T] = valid.dims as [number, number];
  const d = valid.data as Uint8Array;
  const counts: number[] = [];
  for (let b = 0; b < B; b++) {
    let n = 0;
    for (let t = b * T; t < (b + 1) * T; t++) n += d[t]!;
    counts.push(n);
  }
  return counts;
}

/** The slots of per-row lengths (each row's valid slots first). */
export function prefixSlots(lengths: readonly number[]): RowSlots {
  return lengths.map((n) => Array.from({ length: n }, (_, t) => t));
}

/**
 * Whether compacting pays, given each row's token count: more than a quarter of the `T` slots
 * per row would go (the longest row's tokens stay). Never at batch 1, where a routed layer's
 * cache has no empty slot.
 */
export function worthCompacting(counts: readonly number[], T: number): boolean {
  return (T - Math.max(0, ...counts)) * 4 > T;
}

/** A cache tensor with each row's `slots` moved to its front and the sequence axis cut to the longest row; the rest zeros. */
export function compactTensor(t: ort.Tensor, slots: RowSlots, combined: boolean): ort.Tensor {
  const dims = t.dims as number[];
  const axis = combined ? 3 : 2;
  const [lead, B, H, T, D] = combined ? (dims as [number, number, number, number, number]) : [1, ...(dims as [number, number, number, number])];
  const kept = Math.max(0, ...slots.map((r) => r.length));
  const src = t.data as Float32Array | Uint16Array;
  const dst = new (src.constructor as Float32ArrayConstructor | Uint16ArrayConstructor)(lead * B * H * kept * D);
  for (let i = 0; i < lead; i++)
    for (let b = 0; b < B; b++)
      for (let h = 0; h < H; h++) {
        const from = ((i * B + b) * H + h) * T * D;
        const to = ((i * B + b) * H + h) * kept * D;
        copyRuns(src, from, dst, to, slots[b]!, D);
      }
  const out = [...dims];
  out[axis] = kept;
  return new ort.Tensor(t.type as 'float32' | 'float16', dst, out);
}

/** Copies slots (ascending) of D elements from `src` at `from` to consecutive slots of `dst` at `to`, one copy per run of adjacent slots. */
function copyRuns(src: Float32Array | Uint16Array, from: number, dst: Float32Array | Uint16Array, to: number, slots: readonly number[], D: number): void {
  let j = 0;
  while (j < slots.length) {
    let end = j + 1;
    while (end < slots.length && slots[end] === slots[end - 1]! + 1) end++;
    dst.set(src.subarray(from + slots[j]! * D, from + (slots[end - 1]! + 1) * D), to + j * D);
    j = end;
  }
}

/** A validity mask [B, kept] for rows of `counts` valid slots each, packed first. */
export function prefixValid(counts: readonly number[]): ort.Tensor {
  const kept = Math.max(0, ...counts);
  const d = new Uint8Array(counts.length * kept);
  counts.forEach((n, b) => d.fill(1, b * kept, b * kept + n));
  return new ort.Tensor('bool', d, [counts.length, kept]);
}

/** An int64 [B, T] tensor (a sliding-window layer's slot positions) with each row's `slots` moved to its front, cut to the longest row. */
export function compactRows(t: ort.Tensor, slots: RowSlots): ort.Tensor {
  const [B, T] = t.dims as [number, number];
  const kept = Math.max(0, ...slots.map((r) => r.length));
  const src = t.data as BigInt64Array;
  const dst = new BigInt64Array(B * kept);
  for (let b = 0; b < B; b++) slots[b]!.forEach((s, j) => (dst[b * kept + j] = src[b * T + s]!));
  return new ort.Tensor('int64', dst, [B, kept]);
}
