/**
 * Decoder feeds for equivalence tests, from the model's I/O contract: a padded prefill (batch of
 * rows of different lengths, empty past) and a decode step on top of the prefill's presents.
 * Positions count real tokens only (cumsum(mask) - 1, floored at 0).
 */
import type { DecoderIo } from '../compiler/metadata/decoder-io.js';
import { emptyTensor, ort, toFloat32 } from '../compiler/runtime/ort.js';

export type Feeds = Record<string, ort.Tensor>;

export interface Conversation {
  feeds: Feeds;
  /** Per row: 1 for a token, 0 for padding, over every position fed so far. */
  mask: number[][];
}

const ints = (dtype: 'int32' | 'int64', values: number[], dims: number[]) =>
  dtype === 'int32' ? new ort.Tensor('int32', Int32Array.from(values), dims) : new ort.Tensor('int64', BigInt64Array.from(values, BigInt), dims);

export function prefill(io: DecoderIo, rows: number[][], pad: 'left' | 'right'): Conversation {
  const width = Math.max(...rows.map((r) => r.length));
  const ids: number[] = [];
  const mask = rows.map((r) => {
    const fill = Array<number>(width - r.length).fill(0);
    ids.push(...(pad === 'left' ? [...fill, ...r] : [...r, ...fill]));
    const real = r.map(() => 1);
    return pad === 'left' ? [...fill, ...real] : [...real, ...fill];
  });
  const B = rows.length;
  const feeds: Feeds = { [io.inputIds.name]: ints(io.inputIds.dtype, ids, [B, width]) };
  if (io.attentionMask) feeds[io.attentionMask.name] = ints(io.attentionMask.dtype, mask.flat(), [B, width]);
  if (io.positionIds) feeds[io.positionIds.name] = ints(io.positionIds.dtype, positions(mask).flat(), [B, width]);
  for (const kv of io.kv) {
    const dims = kv.layout === 'combined-2BHTD' ? [2, B, kv.numHeads, 0, kv.headSize] : [B, kv.numHeads, 0, kv.headSize];
    feeds[kv.pastKey] = emptyTensor(kv.dtype, dims);
    if (kv.pastValue) feeds[kv.pastValue] = emptyTensor(kv.dtype, dims);
  }
  return { feeds, mask };
}

/** One token per row after `previous`, whose outputs (presents) become the past. */
export function decodeStep(io: DecoderIo, previous: Conversation, outputs: Feeds, next: number[]): Conversation {
  const mask = previous.mask.map((m) => [...m, 1]);
  const B = next.length;
  const feeds: Feeds = { [io.inputIds.name]: ints(io.inputIds.dtype, next, [B, 1]) };
  if (io.attentionMask) feeds[io.attentionMask.name] = ints(io.attentionMask.dtype, mask.flat(), [B, mask[0]!.length]);
  if (io.positionIds)
    feeds[io.positionIds.name] = ints(
      io.positionIds.dtype,
      positions(mask).map((p) => p.at(-1)!),
      [B, 1],
    );
  for (const kv of io.kv) {
    feeds[kv.pastKey] = outputs[kv.presentKey]!;
    if (kv.pastValue) feeds[kv.pastValue] = outputs[kv.presentValue!]!;
  }
  return { feeds, mask };
}

function positions(mask: number[][]): number[][] {
  return mask.map((m) => {
    let seen = -1;
    return m.map((v) => Math.max(0, (seen += v)));
  });
}

/** Largest absolute difference between two tensors of the same shape (float16 widened). */
export function maxAbsDiff(a: ort.Tensor, b: ort.Tensor): number {
  if (a.dims.join() !== b.dims.join()) return Infinity;
  const x = toFloat32(a);
  const y = toFloat32(b);
  let d = 0;
  for (let i = 0; i < x.length; i++) d = Math.max(d, Math.abs(x[i]! - y[i]!));
  return d;
}
