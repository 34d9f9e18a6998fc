/**
 * Standard ONNX attention (docs/forms.md): opset-24 Attention over static KV caches written by
 * TensorScatter (fixtures/forms-static-tiny, onnxruntime/mobius's static-cache form), and opset-23
 * Attention with its own past/present key and value (fixtures/forms-attention23-tiny). Both use
 * RotaryEmbedding-23 and RMSNormalization-23 and hold the same weights as forms-unsorted-tiny.
 */
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { attribute } from '../compiler/core/ir/graph.js';
import { ModReference } from '../compiler/apps/reference/mod-reference.js';
import { decoderIo } from '../compiler/metadata/decoder-io.js';
import { argmax, lastPosition, ModSession } from '../compiler/runtime/session.js';
import { worstReal } from '../compiler/apps/verify/verify.js';
import { FIXTURES_DIR, FORMS_CONFIG, TINY_SEED } from '../fixtures/build-fixtures.js';
import { buildFormDecoder, writeFormModel } from '../fixtures/builder/forms.js';
import { buildStandardDecoder } from '../fixtures/builder/standard.js';
import { DataType } from '../compiler/core/ir/dtype.js';
import { Model } from '../compiler/core/ir/model.js';
import { ort } from '../compiler/runtime/ort.js';
import { GraphBuilder } from '../fixtures/builder/graph-builder.js';
import { expectOneLineError, runCli, tempDir } from './helpers.js';
import { compileWith, expectSameRun, prefillSelection, PROMPTS, rowByRowNll, worstRows } from './mod-helpers.js';

const tmp = tempDir('modc-forms-static');
const STATIC = join(FIXTURES_DIR, 'forms-static-tiny', 'model.onnx');
const CAUSAL = join(FIXTURES_DIR, 'forms-static-causal-tiny', 'causal.onnx');
const ATTN23 = join(FIXTURES_DIR, 'forms-attention23-tiny', 'model.onnx');
const ATTN23_CAUSAL = join(FIXTURES_DIR, 'forms-attention23-causal-tiny', 'causal.onnx');
const ATTN23_PADMASK = join(FIXTURES_DIR, 'forms-attention23-padmask-tiny', 'model.onnx');
/** The same weights in the unfused Llama form (MatMul/Softmax attention, in-graph rotary). */
const UNFUSED = join(FIXTURES_DIR, 'forms-unsorted-tiny', 'unsorted.onnx');
const ROWS = PROMPTS.b3;
/** is_causal=1 without a mask cannot take padding: rows of one length. */
const EQUAL = [
  [5, 6, 7, 8, 9, 10],
  [12, 13, 14, 15, 16, 17],
  [18, 19, 20, 21, 22, 23],
];
let counter = 0;

/**
 * What onnxruntime-node 1.29's CPU EP runs of the standard ops (docs/forms.md, "Standard ONNX attention"): one
 * op per model, run on small inputs; the values checked are the semantics modc relies on.
 */
describe('ONNX Runtime CPU: the standard attention ops', () => {
  const F = DataType.FLOAT;
  const f32 = (dims: number[], fill = (i: number) => Math.sin(i)) =>
    new ort.Tensor(
      'float32',
      Float32Array.from({ length: dims.reduce((a, b) => a * b, 1) }, (_, i) => fill(i)),
      dims,
    );
  const i64 = (v: number[]) => new ort.Tensor('int64', BigInt64Array.from(v, BigInt), [v.length]);
  async function run(opset: number, build: (b: GraphBuilder) => void, feeds: Record<string, ort.Tensor>): Promise<ort.InferenceSession.OnnxValueMapType> {
    const b = new GraphBuilder('op');
    build(b);
    const m = new Model(b.graph, 10);
    m.importOpset('', opset);
    const path = join(tmp, `op${counter++}`, 'model.onnx');
    saveModel(m, path);
    return (await ort.InferenceSession.create(path, { logSeverityLevel: 3 })).run(feeds);
  }
  /** One head of size 1, zero scores, V = one-hot of the key slot: Y is each query's attention weights over 6 slots. */
  const weights = (opset: number, isCausal: number, S: number, nonpad: number) =>
    run(
      opset,
      (b) => {
        const [q, k, v] = [b.input('q', F, [1, S, 1]), b.input('k', F, [1, 6, 1]), b.input('v', F, [1, 6, 6])];
        const y = b.op('Attention', [q, k, v, null, null, null, b.input('n', DataType.INT64, [1])], {
          attrs: [attribute('q_num_heads', 1), attribute('kv_num_heads', 1), attribute('is_causal', isCausal)],
          outputs: ['y'],
        });
        b.output(y, F, [1, S, 6]);
      },
      { q: f32([1, S, 1], () => 0), k: f32([1, 6, 1], () => 0), v: f32([1, 6, 6], (i) => (i % 7 === 0 ? 1 : 0)), n: i64([nonpad]) },
    ).then((o) => Array.from(o.y!.data as Float32Array, (x) => Math.round(x * 100) / 100));

  it('Attention-24 with nonpad_kv_seqlen: keys at or past it are masked; is_causal=1 is aligned bottom-right (query i sees j <= i + nonpad - S)', async () => {
    expect(await weights(24, 0, 1, 4)).toEqual([0.25, 0.25, 0.25, 0.25, 0, 0]);
    expect(await weights(24, 1, 2, 5)).toEqual([0.25, 0.25, 0.25, 0.25, 0, 0, 0.2, 0.2, 0.2, 0.2, 0.2, 0]);
    // Attention-23 has no nonpad_kv_seqlen input: ONNX Runtime refuses the model.
    await expect(weights(23, 0, 1, 4)).rejects.toThrow(/Attention/);
  });

  it('Attention-23 with 3-D q/k/v (q_num_heads, kv_num_heads: GQA) and 4-D past_key/past_value -> present grown by the call', async () => {
    const out = await run(
      23,
      (b) => {
        const [q, k, v] = [b.input('q', F, [2, 3, 32]), b.input('k', F, [2, 3, 16]), b.input('v', F, [2, 3, 16])];
        const [pk, pv] = [b.input('pk', F, [2, 2, 'P', 8]), b.input('pv', F, [2, 2, 'P', 8])];
        const mask = b.input('m', DataType.BOOL, [2, 1, 3, 'T']);
        const o = b.ops('Attention', [q, k, v, mask, pk, pv], {
          attrs: [attribute('q_num_heads', 4), attribute('kv_num_heads', 2)],
          outputs: ['y', 'pk_out', 'pv_out'],
        });
        b.output(o[0]!, F, [2, 3, 32]);
        b.output(o[1]!, F, [2, 2, 'T', 8]);
      },
      {
        q: f32([2, 3, 32]),
        k: f32([2, 3, 16]),
        v: f32([2, 3, 16]),
        pk: f32([2, 2, 2, 8]),
        pv: f32([2, 2, 2, 8]),
        m: new ort.Tensor('bool', new Uint8Array(30).fill(1), [2, 1, 3, 5]),
      },
    );
    expect([out.y!.dims, out.pk_out!.dims]).toEqual([
      [2, 3, 32],
      [2, 2, 5, 8],
    ]);
  });

  it('TensorScatter-24 writes each row at its write index (axis 1 of a 3-D cache); circular wraps; RotaryEmbedding-23 runs on 3-D input with num_heads', async () => {
    // Row 0 writes [1, 2] at slot 1; row 1 writes [3, 4] at slot 4 (linear) or at slot 5, wrapping to 0 (circular).
    for (const [mode, write, want] of [
      ['linear', 4, [0, 1, 2, 0, 0, 0, 0, 0, 0, 0, 3, 4]],
      ['circular', 5, [0, 1, 2, 0, 0, 0, 4, 0, 0, 0, 0, 3]],
    ] as const) {
      const out = await run(
        24,
        (b) => {
          const y = b.op('TensorScatter', [b.input('c', F, [2, 6, 1]), b.input('u', F, [2, 'S', 1]), b.input('w', DataType.INT64, [2])], {
            attrs: [attribute('axis', 1), attribute('mode', mode)],
            outputs: ['y'],
          });
          b.output(y, F, [2, 6, 1]);
        },
        { c: f32([2, 6, 1], () => 0), u: f32([2, 2, 1], (i) => i + 1), w: i64([1, write]) },
      );
      expect(Array.from(out.y!.data as Float32Array), mode).toEqual(want);
    }
    const rotary = await run(
      23,
      (b) => {
        const y = b.op(
          'RotaryEmbedding',
          [
            b.input('x', F, [1, 2, 8]),
            b.floats('cos', [4, 2], Float32Array.of(1, 1, 0, 0, 1, 1, 1, 1)),
            b.floats('sin', [4, 2], Float32Array.of(0, 0, 1, 1, 0, 0, 0, 0)),
            b.input('p', DataType.INT64, [1, 2]),
          ],
          { attrs: [attribute('num_heads', 2)], outputs: ['y'] },
        );
        b.output(y, F, [1, 2, 8]);
      },
      { x: f32([1, 2, 8], (i) => i + 1), p: new ort.Tensor('int64', BigInt64Array.of(0n, 1n), [1, 2]) },
    );
    // Position 0: identity; position 1: a rotation by 90 degrees of each half pair (rotate-half: [x1, x2] -> [-x2, x1]).
    expect(Array.from(rotary.y!.data as Float32Array)).toEqual([1, 2, 3, 4, 5, 6, 7, 8, -11, -12, 9, 10, -15, -16, 13, 14]);
  });
});

describe('the fixtures are the decoder they claim to be', () => {
  it.each([
    ['static', STATIC, 'right'],
    ['opset-23 Attention', ATTN23, 'left'],
    ['opset-23 Attention, is_causal=1 + padding mask', ATTN23_PADMASK, 'left'],
  ] as const)('%s: the same logits as the unfused model of the same weights, prefill and 8 decode steps (%s padding)', async (_, path, pad) => {
    const [a, b] = [await ModSession.create(path), await ModSession.create(UNFUSED)];
    expect(worstReal(await a.forward(ROWS, { pad }), await b.forward(ROWS, { pad }), ROWS, pad)).toBeLessThan(1e-4);
    for (let t = 0; t < 8; t++) {
      const next = ROWS.map((_, r) => 3 + t + r);
      expect(worstRows(lastPosition(await a.step(next)), lastPosition(await b.step(next))), `step ${t}`).toBeLessThan(1e-4);
    }
  });

  it.each([
    ['static', CAUSAL],
    ['opset-23', ATTN23_CAUSAL],
  ])('%s: is_causal=1 with no mask agrees with the masked form on unpadded rows; rows of different lengths are refused', async (_, path) => {
    const rows = [
      [5, 6, 7, 8],
      [9, 10, 11, 12],
    ];
    const [a, b] = [await ModSession.create(path), await ModSession.create(STATIC)];
    await expect(
      a.forward([
        [1, 2, 3],
        [4, 5],
      ]),
    ).rejects.toThrow(/rows of different lengths need padding, which this model cannot mask/);
    expect(worstReal(await a.forward(rows), await b.forward(rows), rows, 'right')).toBeLessThan(1e-5);
    expect(worstRows(lastPosition(await a.step([1, 2])), lastPosition(await b.step([1, 2])))).toBeLessThan(1e-5);
  });
});

describe('analysis', () => {
  it('static caches: each layer is a StandardAttention over its TensorScatter buffers; write_indices and nonpad_kv_seqlen are lengths, position_ids per-token', () => {
    const s = analyzeDecoder(loadModel(STATIC));
    expect(s.layers.map((l) => l.attention.form)).toEqual(['StandardAttention', 'StandardAttention', 'StandardAttention']);
    expect(s.layers.map((l) => [l.kv.layout, l.kv.key.input.name, l.kv.key.output.name, l.kv.value.input.name, l.kv.value.output.name])).toEqual(
      [0, 1, 2].map((i) => ['static-BTH', `key_cache.${i}`, `updated_key_cache.${i}`, `value_cache.${i}`, `updated_value_cache.${i}`]),
    );
    expect([s.numHeads, s.numKvHeads, s.headSize, s.positional]).toEqual([4, 2, 8, 'rotary-op']);
    const kinds = s.layers[1]!.sideInputs.filter((si) => si.kind !== 'weight').map(
      (si) => `${si.kind}:${si.value.name}:${'role' in si ? si.role : 'form' in si ? si.form : ''}`,
    );
    expect(kinds).toEqual(
      expect.arrayContaining([
        'per-token:position_ids:positions',
        'sequence-length:write_indices:write_indices',
        'sequence-length:nonpad_kv_seqlen:nonpad_kv_seqlen',
        'past-kv:key_cache.1:key',
      ]),
    );
    expect(kinds.filter((k) => k.startsWith('other'))).toEqual([]);
  });

  it('opset-23 Attention with past/present: BHTD caches, the mask built from attention_mask', () => {
    const s = analyzeDecoder(loadModel(ATTN23));
    expect(s.layers.map((l) => [l.attention.form, l.kv.layout, l.kv.key.output.name])).toEqual(
      [0, 1, 2].map((i) => ['StandardAttention', 'BHTD', `present.${i}.key`]),
    );
    expect(s.mask.inputs.map((v) => v.name)).toContain('attention_mask');
  });

  it('decoderIo: buffers of 64 slots, the write index and valid-key inputs, right padding only', () => {
    const io = decoderIo(loadModel(STATIC));
    expect(io.kv.map((b) => [b.layout, b.pastKey, b.presentKey, b.numHeads, b.headSize, b.maxLength])).toEqual(
      [0, 1, 2].map((i) => ['static-BTH', `key_cache.${i}`, `updated_key_cache.${i}`, 2, 8, 64]),
    );
    expect([io.writeIndices?.name, io.nonpadKvSeqlen?.name, io.attentionMask, io.paddingSides, io.maxPositions]).toEqual([
      'write_indices',
      'nonpad_kv_seqlen',
      null,
      ['right'],
      256,
    ]);
  });

  it('static caches under other names (past_key_values.N.key -> present.N.key, write index and valid keys renamed) are found by what reads them', async () => {
    const model = loadModel(STATIC);
    for (const v of [...model.graph.inputs, ...model.graph.outputs]) {
      const m = /^(updated_)?(key|value)_cache\.(\d+)$/.exec(v.name);
      if (m) v.name = m[1] ? `present.${m[3]}.${m[2]}` : `past_key_values.${m[3]}.${m[2]}`;
      if (v.name === 'write_indices') v.name = 'cache_write_index';
      if (v.name === 'nonpad_kv_seqlen') v.name = 'kv_valid_length';
    }
    const path = join(tmp, 'hf-names', 'model.onnx');
    saveModel(model, path);
    const io = decoderIo(loadModel(path));
    expect(io.kv.map((b) => [b.layout, b.pastKey, b.presentValue, b.maxLength])).toEqual(
      [0, 1, 2].map((i) => ['static-BTH', `past_key_values.${i}.key`, `present.${i}.value`, 64]),
    );
    const [a, b] = [await ModSession.create(path), await ModSession.create(STATIC)];
    expect(worstReal(await a.forward(ROWS, { pad: 'right' }), await b.forward(ROWS, { pad: 'right' }), ROWS, 'right')).toBe(0);
    // Every layer converted: the runners still find the renamed inputs (the compile records them).
    const compiled = compileWith(tmp, path, 'random', { mode: 'threshold', threshold: 0.5 });
    expect([decoderIo(loadModel(compiled.path)).writeIndices?.name, decoderIo(loadModel(compiled.path)).nonpadKvSeqlen?.name]).toEqual([
      'cache_write_index',
      'kv_valid_length',
    ]);
    const verify = await runCli('verify', path, compiled.path);
    expect(verify.code, verify.stderr).toBe(0);
  });

  it("a buffer that reaches Attention through Identity/Reshape is still the layer's static cache", () => {
    const model = loadModel(STATIC);
    for (const n of model.graph.nodes.filter((x) => x.opType === 'Attention')) {
      for (const slot of [1, 2]) {
        const id = model.graph.addNode('Identity', [n.input(slot)], 1);
        n.setInput(slot, id.output(0));
      }
    }
    model.graph.toposort();
    const s = analyzeDecoder(model);
    expect(s.layers.map((l) => [l.kv.layout, l.kv.key.input.name])).toEqual([0, 1, 2].map((i) => ['static-BTH', `key_cache.${i}`]));
  });

  it('a static-cache mask computed from position_ids (slots compared with positions) keeps every layer dense: the compile fails in one line, saying why', async () => {
    const path = join(tmp, 'positions', 'model.onnx');
    writeFormModel(buildFormDecoder(FORMS_CONFIG, TINY_SEED, { attention: 'static', staticCausal: 'positions' }), path);
    const [a, b] = [await ModSession.create(path), await ModSession.create(STATIC)];
    expect(worstReal(await a.forward(ROWS, { pad: 'right' }), await b.forward(ROWS, { pad: 'right' }), ROWS, 'right')).toBeLessThan(1e-5);
    const out = join(tmp, 'positions-out', 'model.onnx');
    const res = await runCli('compile', path, '-o', out, '--router-init', 'random', '--json');
    expect(res.code).toBe(1);
    expect(res.stdout).toBe('');
    expect(res.stderr.trim().split('\n')).toHaveLength(1);
    expect(res.stderr).toMatch(
      /^modc: no layer was converted \(layer 0: [^;]*computed from position_ids: it compares cache slots with positions.*; layers 1, 2 also stayed dense\)\n?$/,
    );
    expect(existsSync(out)).toBe(false);
  });

  it('a static cache without nonpad_kv_seqlen is refused in one line, naming the node', async () => {
    const model = loadModel(STATIC);
    for (const n of model.graph.nodes.filter((x) => x.opType === 'Attention')) n.setInput(6, null);
    model.graph.inputs = model.graph.inputs.filter((v) => v.name !== 'nonpad_kv_seqlen');
    const path = join(tmp, 'no-nonpad', 'model.onnx');
    saveModel(model, path);
    expectOneLineError(
      await runCli('compile', path, '-o', join(tmp, 'no-nonpad-out', 'model.onnx'), '--router-init', 'all-pass'),
      1,
      /Attention.*a static KV cache \(TensorScatter\) without nonpad_kv_seqlen is not supported/,
    );
  });

  it('a static-cache mask with a sliding window (a second comparison of slots) routes every layer, with the window by original position, and passes verify', async () => {
    const path = join(tmp, 'window', 'model.onnx');
    writeFormModel(buildFormDecoder(FORMS_CONFIG, TINY_SEED, { attention: 'static', localWindow: 3 }), path);
    // The window matters: other logits than the full causal mask once the prompt is longer than it.
    const [a, b] = [await ModSession.create(path), await ModSession.create(STATIC)];
    expect(worstReal(await a.forward(ROWS, { pad: 'right' }), await b.forward(ROWS, { pad: 'right' }), ROWS, 'right')).toBeGreaterThan(1e-3);
    const out = join(tmp, 'window-out', 'model.onnx');
    const res = await runCli('compile', path, '-o', out, '--router-init', 'random', '--json');
    expect(res.code, res.stderr).toBe(0);
    expect(JSON.parse(res.stdout).routing.converted.map((l: { layer: number }) => l.layer)).toEqual([0, 1, 2]);
    expect(
      loadModel(out)
        .graph.inputs.filter((v) => v.name.startsWith('past_positions'))
        .map((v) => v.shape),
    ).toEqual([0, 1, 2].map((l) => ['batch', `max_sequence_length_${l}`]));
    const verify = await runCli('verify', path, out, '--json');
    expect(verify.code, verify.stdout + verify.stderr).toBe(0);
    expect(JSON.parse(verify.stdout).passed).toBe(true);
  });

  it('a circular TensorScatter (ring buffer) is refused in one line, naming the node', async () => {
    const model = loadModel(STATIC);
    const scatter = model.graph.nodes.find((n) => n.opType === 'TensorScatter')!;
    scatter.setAttr(attribute('mode', 'circular'));
    const path = join(tmp, 'circular', 'model.onnx');
    saveModel(model, path);
    const why = /TensorScatter.*mode 'circular' is not supported: a circular \(ring-buffer\) cache/;
    expect(() => analyzeDecoder(loadModel(path))).toThrow(why);
    expectOneLineError(await runCli('inspect', path), 1, why);
  });
});

describe.each([
  ['static caches', STATIC, ROWS],
  ['static caches, is_causal=1 without a mask', CAUSAL, EQUAL],
  ['opset-23 Attention', ATTN23, ROWS],
  ['opset-23 Attention, is_causal=1 without a mask or attention_mask', ATTN23_CAUSAL, EQUAL],
  ['opset-23 Attention, is_causal=1 + padding mask', ATTN23_PADMASK, ROWS],
])('compile: %s', (_, path, rows) => {
  it.each(['block', 'attention', 'mlp'] as const)(
    'all-pass (%s) reproduces the original at real positions: prefill and 8 decode steps',
    async (granularity) => {
      const compiled = compileWith(tmp, path, 'all-pass', { gated: false, granularity });
      expect(compiled.plan.layers).toHaveLength(3);
      const [orig, mod] = await Promise.all([ModSession.create(path), ModSession.create(compiled.path)]);
      await expectSameRun(orig, mod, rows, 'right', 8, 1e-4, granularity);
      expect(mod.kvBytes()).toBe(orig.kvBytes());
    },
  );

  it.each([
    ['block', 'threshold'],
    ['attention', 'threshold'],
    ['block', 'topk'],
  ] as const)('random routers (%s, %s) agree with the reference executor in prefill and decode, with partial selection', async (granularity, mode) => {
    const compiled = compileWith(tmp, path, 'random', { mode, threshold: 0.5, capacity: 0.5, gated: true, granularity });
    const mod = await ModSession.create(compiled.path);
    const ref = await ModReference.create(path, compiled.plan, join(tmp, `ref${counter++}`));
    try {
      expect(worstReal(await mod.forward(rows, { pad: 'right' }), await ref.forward(rows, { pad: 'right' }), rows, 'right'), 'prefill').toBeLessThan(1e-4);
      for (let t = 0; t < 8; t++) {
        const next = rows.map((_, r) => t + r + 1);
        expect(worstRows(lastPosition(await mod.step(next)), lastPosition(await ref.step(next))), `step ${t}`).toBeLessThan(1e-4);
      }
      const { selected, real } = prefillSelection(ref, rows);
      expect(selected).toBeGreaterThan(0);
      expect(selected).toBeLessThan(real);
      // Threshold routing: some layer selects different counts in different rows (a row runs fewer
      // tokens than K). Top-k keeps ceil(c * n) per row, the same count for rows of one length.
      const counts = [...ref.selections[0]!.values()].map((perRow) => perRow.map((picks) => picks.length));
      if (mode === 'threshold') expect(counts.some((c) => new Set(c).size > 1)).toBe(true);
      const lengths = mod.layerCacheLengths();
      expect(lengths).toEqual(ref.layerCacheLengths());
      const context = rows.map((r) => r.length + 8);
      expect(lengths.some((layer) => layer.some((n, r) => n < context[r]!))).toBe(true);
      // A row that selected fewer tokens than another leaves empty slots until the session compacts.
      mod.compact();
      expect(mod.layerCacheLengths()).toEqual(lengths);
      expect(mod.kvBytes()).toBe(ref.kvBytes());
    } finally {
      await ref.release();
    }
  });
});

describe('the compiled static-cache interface', () => {
  it('a converted layer has its own buffer (open length), past_lengths.l and present_lengths.l; the others keep write_indices', () => {
    const compiled = compileWith(tmp, STATIC, 'random', { mode: 'threshold', threshold: 0.5 });
    const model = loadModel(compiled.path);
    const inputs = new Map(model.graph.inputs.map((v) => [v.name, v]));
    expect(inputs.get('key_cache.0')!.shape).toEqual(['batch', 'max_sequence_length_0', 16]);
    expect(inputs.get('past_lengths.0')!.shape).toEqual(['batch']);
    expect(model.graph.outputs.map((v) => v.name)).toEqual(expect.arrayContaining(['present_lengths.0', 'updated_key_cache.0', 'updated_value_cache.2']));
    expect(inputs.has('write_indices') && inputs.has('nonpad_kv_seqlen')).toBe(true);
    const io = decoderIo(model);
    expect(io.staticCacheLength).toBe(64);
    expect(model.metadataProps.find((p) => p.key === 'modc.static_cache_inputs')?.value).toBe(
      '{"write_indices":"write_indices","nonpad_kv_seqlen":"nonpad_kv_seqlen"}',
    );
    expect([io.writeIndices?.name, io.nonpadKvSeqlen?.name]).toEqual(['write_indices', 'nonpad_kv_seqlen']);
    expect(io.kv.map((b) => b.pastLength)).toEqual(['past_lengths.0', 'past_lengths.1', 'past_lengths.2']);
  });

  it('a layer that routes only its MLP keeps the original interface', () => {
    const mlp = compileWith(tmp, STATIC, 'random', { granularity: 'mlp' });
    expect(loadModel(mlp.path).graph.inputs.some((v) => v.name.startsWith('past_lengths'))).toBe(false);
  });

  it('is_causal=1 without a mask: a converted layer gets the causal mask by slot (is_causal=0); runners refuse rows of different lengths; verify cuts its default prompt to one length', async () => {
    const compiled = compileWith(tmp, CAUSAL, 'random', { mode: 'threshold', threshold: 0.5 });
    const attention = [...loadModel(compiled.path).allNodes()].filter((n) => n.opType === 'Attention');
    expect(attention.map((n) => [n.attrInt('is_causal'), n.input(3) !== null])).toEqual([
      [0, true],
      [0, true],
      [0, true],
    ]);
    expectOneLineError(
      await runCli('run', CAUSAL, '--ids', '1,2,3;4,5'),
      1,
      /rows of different lengths need padding, which this model cannot mask \(.*is_causal=1 aligned on nonpad_kv_seqlen, with no attn_mask/,
    );
    const verify = await runCli('verify', CAUSAL, compiled.path, '--json');
    expect(verify.code, verify.stderr).toBe(0);
    expect(JSON.parse(verify.stdout).passed).toBe(true);
  });
});

describe('the CLI on static caches', () => {
  const routed = join(tmp, 'cli-routed', 'model.onnx');

  it('run --json reports which positions are real (no attention_mask input); --pad left is refused in one line', async () => {
    const res = await runCli('run', STATIC, '--ids', '1,2,3;4,5', '--json');
    expect(res.code).toBe(0);
    expect(res.stderr).toBe('');
    expect(JSON.parse(res.stdout).attentionMask).toEqual([
      [1, 1, 1],
      [1, 1, 0],
    ]);
    expectOneLineError(
      await runCli('run', STATIC, '--ids', '1,2,3;4,5', '--pad', 'left'),
      2,
      /--pad left is not supported for this model: a static KV cache \(TensorScatter\)/,
    );
  });

  it('compile, verify, generate, bench and eval run the original and the routed compile', async () => {
    expect((await runCli('compile', STATIC, '-o', routed, '-q', '--router-init', 'random')).code).toBe(0);
    const verify = await runCli('verify', STATIC, routed, '--json');
    expect(verify.code, verify.stderr).toBe(0);
    expect(JSON.parse(verify.stdout).passed).toBe(true);
    const gen = await Promise.all([STATIC, routed].map((p) => runCli('generate', p, '--ids', '1,2,3;4,5', '--max-new', '4', '--json')));
    for (const g of gen) expect(g.code, g.stderr).toBe(0);
    expect(JSON.parse(gen[1]!.stdout).cacheLengths).toHaveLength(3);
    const bench = await runCli('bench', STATIC, routed, '--prompt', '6', '--steps', '2', '--runs', '1', '--warmup', '0', '--json');
    expect(bench.code, bench.stderr).toBe(0);
    const data = join(tmp, 'eval.jsonl');
    writeFileSync(data, '{"ids": [5, 6, 7, 8, 9, 10]}\n{"ids": [11, 12, 13]}\n');
    const nll = async (p: string) => {
      const res = await runCli('eval', p, '--data', data, '--json');
      expect(res.code, res.stderr).toBe(0);
      return JSON.parse(res.stdout).nll as number;
    };
    // The static form scores as the same weights with growing caches.
    expect(Math.abs((await nll(STATIC)) - (await nll(UNFUSED)))).toBeLessThan(1e-5);
    // The routed compile scores as its own logits say, row by row.
    expect(
      Math.abs(
        (await nll(routed)) -
          (await rowByRowNll(routed, [
            [5, 6, 7, 8, 9, 10],
            [11, 12, 13],
          ])),
      ),
    ).toBeLessThan(1e-5);
    // is_causal=1 without a mask cannot pad: eval runs it one sequence at a time, scoring as the masked form.
    expect(Math.abs((await nll(CAUSAL)) - (await nll(STATIC)))).toBeLessThan(1e-5);
  });

  it('calibrate fits routers on a static-cache model (its capture feeds the buffers and lengths); codegen refuses it in one line', async () => {
    const data = join(tmp, 'calib.jsonl');
    writeFileSync(data, '{"ids": [5, 6, 7, 8, 9, 10]}\n{"ids": [11, 12, 13]}\n{"ids": [14, 15, 16, 17]}\n');
    const routers = join(tmp, 'routers.safetensors');
    const cal = await runCli('calibrate', STATIC, '--data', data, '-o', routers, '--target-compute', '0.7', '-q');
    expect(cal.code, cal.stderr).toBe(0);
    const out = join(tmp, 'calibrated', 'model.onnx');
    expect((await runCli('compile', STATIC, '--routers', routers, '-o', out, '-q')).code).toBe(0);
    expect((await runCli('verify', STATIC, out)).code).toBe(0);
    expectOneLineError(
      await runCli('codegen', STATIC, '-o', join(tmp, 'session.ts')),
      1,
      /codegen does not support static KV caches yet \(key_cache\.0 is a TensorScatter buffer\)/,
    );
  });

  it('float16 static caches: the model runs (within fp16 rounding of the float32 one) and a routed compile passes verify', async () => {
    const path = join(tmp, 'f16', 'model.onnx');
    writeFormModel(buildStandardDecoder(FORMS_CONFIG, TINY_SEED, { cache: 'static', float16: true }), path);
    expect(decoderIo(loadModel(path)).kv[0]!.dtype).toBe('float16');
    const [a, b] = [await ModSession.create(path), await ModSession.create(STATIC)];
    const diff = worstReal(await a.forward(ROWS, { pad: 'right' }), await b.forward(ROWS, { pad: 'right' }), ROWS, 'right');
    expect(diff).toBeGreaterThan(0);
    expect(diff).toBeLessThan(2e-2);
    const out = join(tmp, 'f16-routed', 'model.onnx');
    expect((await runCli('compile', path, '-o', out, '-q', '--router-init', 'random')).code).toBe(0);
    const verify = await runCli('verify', path, out, '--json');
    expect(verify.code, verify.stderr).toBe(0);
    expect(JSON.parse(verify.stdout).tolerance).toBe(1e-2);
  });

  it('a context longer than the buffer is refused in one line', async () => {
    const session = await ModSession.create(STATIC);
    await expect(session.forward([Array.from({ length: 65 }, (_, i) => i + 1)])).rejects.toThrow(
      /a context of 65 tokens does not fit the model's static KV cache of 64 slots/,
    );
    // The refusal left the session usable: the same logits as the same weights with growing caches.
    const after = await session.forward([[1, 2, 3]]);
    const growing = await (await ModSession.create(UNFUSED)).forward([[1, 2, 3]]);
    expect(worstReal(after, growing, [[1, 2, 3]], 'right')).toBeLessThan(1e-4);
    expect(argmax(lastPosition(after)[0]!)).toBe(argmax(lastPosition(growing)[0]!));
  });
});
