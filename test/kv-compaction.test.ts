/**
 * Compaction of a routed layer's cache between calls (compiler/runtime/kv-compaction.ts): the
 * helpers on small tensors, and ModSession compacting at batch > 1 without changing any logit.
 */
import { describe, expect, it } from 'vitest';
import { compactRows, compactTensor, prefixSlots, prefixValid, validCounts, validSlots, worthCompacting } from '../compiler/runtime/kv-compaction.js';
import { ort } from '../compiler/runtime/ort.js';
import { lastPosition, ModSession } from '../compiler/runtime/session.js';
import { fixture, tempDir } from './helpers.js';
import { compileWith, PROMPTS, splittingThreshold, worstRows } from './mod-helpers.js';

const tmp = tempDir('modc-kv-compaction');

/** [B, H, T, D] with element (b, h, t, d) = 1000 b + 100 h + 10 t + d. */
function cache(B: number, H: number, T: number, D: number): ort.Tensor {
  const data = new Float32Array(B * H * T * D);
  for (let b = 0; b < B; b++)
    for (let h = 0; h < H; h++) for (let t = 0; t < T; t++) for (let d = 0; d < D; d++) data[((b * H + h) * T + t) * D + d] = 1000 * b + 100 * h + 10 * t + d;
  return new ort.Tensor('float32', data, [B, H, T, D]);
}

describe('kv-compaction helpers', () => {
  const valid = new ort.Tensor('bool', Uint8Array.from([1, 0, 1, 1, 0, 0, 1, 0, 0, 0]), [2, 5]);

  it("reads each row's valid slots and counts from a validity mask", () => {
    expect(validSlots(valid)).toEqual([[0, 2, 3], [1]]);
    expect(validCounts(valid)).toEqual([3, 1]);
    expect(prefixSlots([2, 0])).toEqual([[0, 1], []]);
  });

  it("moves each row's valid slots to its front, in order, cut to the longest row; the rest zeros", () => {
    const out = compactTensor(cache(2, 2, 5, 2), validSlots(valid), false);
    expect(out.dims).toEqual([2, 2, 3, 2]);
    // Row 0 keeps slots 0, 2, 3; row 1 keeps slot 1, then zeros.
    expect(Array.from(out.data as Float32Array)).toEqual([0, 1, 20, 21, 30, 31, 100, 101, 120, 121, 130, 131, 1010, 1011, 0, 0, 0, 0, 1110, 1111, 0, 0, 0, 0]);
  });

  it('compacts the combined [2, B, H, T, D] layout on its sequence axis, key and value alike', () => {
    const kv = cache(4, 1, 5, 1); // read as [2, B=2, H=1, T=5, D=1]: leading 0 key, 1 value
    const combined = new ort.Tensor('float32', kv.data as Float32Array, [2, 2, 1, 5, 1]);
    const out = compactTensor(combined, validSlots(valid), true);
    expect(out.dims).toEqual([2, 2, 1, 3, 1]);
    expect(Array.from(out.data as Float32Array)).toEqual([0, 20, 30, 1010, 0, 0, 2000, 2020, 2030, 3010, 0, 0]);
  });

  it('float16 caches keep their type; slot positions and validity follow the same packing', () => {
    const half = new ort.Tensor(
      'float16',
      Uint16Array.from({ length: 10 }, (_, i) => i + 1),
      [2, 1, 5, 1],
    );
    const out = compactTensor(half, validSlots(valid), false);
    expect([out.type, Array.from(out.data as Uint16Array)]).toEqual(['float16', [1, 3, 4, 7, 0, 0]]);
    const positions = new ort.Tensor('int64', BigInt64Array.from([0n, 1n, 2n, 3n, 4n, 5n, 6n, 7n, 8n, 9n]), [2, 5]);
    expect(Array.from(compactRows(positions, validSlots(valid)).data as BigInt64Array, Number)).toEqual([0, 2, 3, 6, 0, 0]);
    const packed = prefixValid([3, 1]);
    expect([packed.dims, Array.from(packed.data as Uint8Array)]).toEqual([
      [2, 3],
      [1, 1, 1, 1, 0, 0],
    ]);
  });

  it('pays only when more than a quarter of the slots would go', () => {
    expect(worthCompacting([3, 1], 5)).toBe(true);
    expect(worthCompacting([4, 1], 5)).toBe(false);
    expect(worthCompacting([8], 8)).toBe(false);
  });
});

describe('ModSession compaction at batch 3', () => {
  it.each(['llama-builder-tiny', 'forms-fused-gpt2-tiny', 'forms-gqa-fp16-tiny'])(
    '%s: compacting after every step gives the logits of compacting past the bound, and packs every row',
    async (name) => {
      const path = fixture(name);
      const pad = name === 'forms-gqa-fp16-tiny' ? 'right' : 'left';
      const threshold = await splittingThreshold(tmp, path, PROMPTS.b3, pad, { gated: true });
      const compiled = compileWith(tmp, path, 'random', { mode: 'threshold', gated: true, threshold });
      const [lazy, eager] = await Promise.all([ModSession.create(compiled.path), ModSession.create(compiled.path)]);
      await lazy.forward(PROMPTS.b3, { pad });
      await eager.forward(PROMPTS.b3, { pad });
      eager.compact();
      let emptied = false;
      for (let t = 0; t < 16; t++) {
        const next = [t + 1, t + 2, t + 3];
        const a = lastPosition(await lazy.step(next));
        const b = lastPosition(await eager.step(next));
        eager.compact();
        emptied ||= eager.kvBytes() < lazy.kvBytes();
        expect(worstRows(a, b), `step ${t}`).toBeLessThan(1e-5);
        expect(eager.layerCacheLengths()).toEqual(lazy.layerCacheLengths());
      }
      // Some step left empty slots that compaction removed (rows selected different counts).
      expect(emptied).toBe(true);
      lazy.compact();
      expect(lazy.kvBytes()).toBe(eager.kvBytes());
    },
  );
});
