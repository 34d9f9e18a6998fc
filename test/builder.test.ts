/**
 * The decoder builder (fixtures/builder): its Llama form is a correct decoder in ONNX Runtime,
 * its genai form computes the same function with ORT's fused ops, its fused GPT-2 form keeps its
 * caches consistent and masks padding, the checked-in fixtures are what it produces, and
 * 7B-shaped graphs build without materializing weights.
 */
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { loadModel } from '../compiler/core/io/load.js';
import { DataType, floatToHalf } from '../compiler/core/ir/dtype.js';
import { verifyModel } from '../compiler/core/ir/validate.js';
import { createSession, emptyTensor, int64Tensor, ort, toFloat32 } from '../compiler/runtime/ort.js';
import { BUILDER_FIXTURES, buildFixtures, FIXTURES_DIR } from '../fixtures/build-fixtures.js';
import { type DecoderConfig, resolveConfig } from '../fixtures/builder/config.js';
import { buildGenaiDecoder, writeGenaiModel } from '../fixtures/builder/genai.js';
import { buildLlamaDecoder, writeLlamaModel } from '../fixtures/builder/llama.js';
import { decoderWeightSpecs, sidecarLayout } from '../fixtures/builder/weights.js';
import { writeFusedGpt2Model } from '../fixtures/builder/gpt2-fused.js';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { lastPosition, ModSession } from '../compiler/runtime/session.js';
import { tempDir } from './helpers.js';

const tmp = tempDir('modc-builder');

// ---------------------------------------------------------------------------------------------
// Running a decoder step

interface Step {
  ids: number[][];
  mask: number[][];
  positions: number[][];
}

interface StepResult {
  /** [batch][position] -> vocab logits */
  logits: Float32Array[][];
  outputs: ort.InferenceSession.OnnxValueMapType;
}

class Decoder {
  private constructor(
    private readonly session: ort.InferenceSession,
    private readonly cfg: DecoderConfig,
    private readonly kvType: 'float32' | 'float16',
  ) {}

  static async open(path: string, cfg: DecoderConfig, kvType: 'float32' | 'float16'): Promise<Decoder> {
    return new Decoder(await createSession(path), cfg, kvType);
  }

  /** One forward call; `past` is a previous result (its presents), or null for an empty cache. */
  async run(step: Step, past: StepResult | null): Promise<StepResult> {
    const rows = (r: number[][]) => int64Tensor(r.flat(), [r.length, r[0]!.length]);
    const feeds: Record<string, ort.Tensor> = { input_ids: rows(step.ids), attention_mask: rows(step.mask), position_ids: rows(step.positions) };
    const c = resolveConfig(this.cfg);
    for (let l = 0; l < c.numLayers; l++) {
      for (const kind of ['key', 'value']) {
        feeds[`past_key_values.${l}.${kind}`] = past
          ? (past.outputs[`present.${l}.${kind}`] as ort.Tensor)
          : emptyTensor(this.kvType, [step.ids.length, c.numKvHeads, 0, c.headSize]);
      }
    }
    const outputs = await this.session.run(feeds);
    const flat = toFloat32(outputs.logits!);
    const [batch, seq, vocab] = outputs.logits!.dims as number[];
    const logits = Array.from({ length: batch! }, (_, b) =>
      Array.from({ length: seq! }, (_, s) => flat.slice((b * seq! + s) * vocab!, (b * seq! + s + 1) * vocab!)),
    );
    return { logits, outputs };
  }
}

/** position_ids = max(cumsum(mask) - 1, 0), per row, for the last `seq` columns. */
function positionsFor(mask: number[][], seq: number): number[][] {
  return mask.map((row) => {
    let sum = 0;
    const pos = row.map((m) => Math.max((sum += m) - 1, 0));
    return pos.slice(pos.length - seq);
  });
}

/** Rows of token ids (0 = padding, on the left) -> a prefill step over the first `len` columns. */
function prefill(tokens: number[][], len: number): Step {
  const ids = tokens.map((r) => r.slice(0, len));
  const mask = ids.map((r) => r.map((t) => (t === 0 ? 0 : 1)));
  return { ids, mask, positions: positionsFor(mask, len) };
}

/** The one-token step after prefill(tokens, len). */
function decode(tokens: number[][], len: number): Step {
  const mask = tokens.map((r) => r.slice(0, len + 1).map((t) => (t === 0 ? 0 : 1)));
  return { ids: tokens.map((r) => [r[len]!]), mask, positions: positionsFor(mask, 1) };
}

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  expect(a.length).toBe(b.length);
  let worst = 0;
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i]! - b[i]!));
  return worst;
}

const PROMPT = [17, 4, 301, 99, 250, 8, 42];
/** Batch 2: row 0 left-padded by 2 (pad id 0), row 1 full. */
const PADDED = [
  [0, 0, 17, 4, 301, 99, 250],
  [3, 77, 150, 12, 64, 500, 9],
];

const TINY_LLAMA: DecoderConfig = { hiddenSize: 64, numLayers: 3, numHeads: 4, numKvHeads: 2, intermediateSize: 128, vocabSize: 512, maxPositions: 256 };

// ---------------------------------------------------------------------------------------------

describe.each([
  ['llama', buildLlamaDecoder, TINY_LLAMA, DataType.FLOAT, 2],
  ['genai', buildGenaiDecoder, { ...TINY_LLAMA, numKvHeads: 4 }, DataType.FLOAT16, 4],
] as const)('%s form: graph I/O', (_, build, cfg, floatType, kvHeads) => {
  it('follows the project convention (names, types, symbolic dims) and passes the IR verifier', () => {
    const model = build(cfg, { kind: 'random', seed: 1 });
    expect(verifyModel(model)).toEqual([]);
    const signature = (vs: readonly { name: string; dtype: number | undefined; shape: unknown }[]) => vs.map((v) => [v.name, v.dtype, v.shape]);
    const cache = (prefix: string, len: string) =>
      [0, 1, 2].flatMap((i) => ['key', 'value'].map((k) => [`${prefix}${i}.${k}`, floatType, ['batch', kvHeads, len, 16]]));
    expect(signature(model.graph.inputs)).toEqual([
      ['input_ids', DataType.INT64, ['batch', 'sequence_length']],
      ['attention_mask', DataType.INT64, ['batch', 'total_sequence_length']],
      ['position_ids', DataType.INT64, ['batch', 'sequence_length']],
      ...cache('past_key_values.', 'past_sequence_length'),
    ]);
    expect(signature(model.graph.outputs)).toEqual([['logits', floatType, ['batch', 'sequence_length', 512]], ...cache('present.', 'total_sequence_length')]);
    expect(model.opsetVersion('')).toBe(17);
  });
});

describe('Llama form', () => {
  let llama: Decoder;
  beforeAll(async () => {
    const path = join(tmp, 'llama', 'model.onnx');
    writeLlamaModel(TINY_LLAMA, { kind: 'random', seed: 7 }, path);
    llama = await Decoder.open(path, TINY_LLAMA, 'float32');
  });

  it('prefill of 6 then one decode step gives the last-position logits of a prefill of 7, batch 1 and left-padded batch 2', async () => {
    for (const tokens of [[PROMPT], PADDED]) {
      const whole = await llama.run(prefill(tokens, 7), null);
      const first = await llama.run(prefill(tokens, 6), null);
      const step = await llama.run(decode(tokens, 6), first);
      tokens.forEach((row, b) => {
        expect(maxAbsDiff(step.logits[b]![0]!, whole.logits[b]![6]!), `row ${b} of ${tokens.length}`).toBeLessThan(1e-4);
        // Causality: the first 6 tokens cannot tell whether a 7th follows. (A padding position
        // attends uniformly to every key, all masked, so it is left out.)
        for (let s = 0; s < 6; s++) if (row[s] !== 0) expect(maxAbsDiff(first.logits[b]![s]!, whole.logits[b]![s]!)).toBeLessThan(1e-4);
      });
    }
  });

  it('masks padding: a left-padded row gives the logits of the same tokens unpadded, and would not if pads were visible', async () => {
    const real = PADDED[0]!.filter((t) => t !== 0);
    const padded = await llama.run(prefill(PADDED, 7), null);
    const alone = await llama.run(prefill([real], real.length), null);
    for (let s = 0; s < real.length; s++) expect(maxAbsDiff(padded.logits[0]![2 + s]!, alone.logits[0]![s]!)).toBeLessThan(1e-4);
    const visible = { ...prefill(PADDED, 7), mask: PADDED.map((r) => r.map(() => 1)) };
    const unmasked = await llama.run(visible, null);
    expect(maxAbsDiff(unmasked.logits[0]![6]!, alone.logits[0]![real.length - 1]!)).toBeGreaterThan(0.1);
  });

  it('has logits that are not flat and depend on token order, but not on a shift of all positions (RoPE is relative)', async () => {
    const a = await llama.run(prefill([PROMPT], 7), null);
    const swapped = await llama.run(prefill([[PROMPT[1]!, PROMPT[0]!, ...PROMPT.slice(2)]], 7), null);
    const shifted = await llama.run({ ...prefill([PROMPT], 7), positions: [PROMPT.map((_, i) => i + 5)] }, null);
    const last = a.logits[0]![6]!;
    expect(Math.sqrt(last.reduce((s, v) => s + v * v, 0) / last.length)).toBeGreaterThan(0.3);
    expect(maxAbsDiff(last, swapped.logits[0]![6]!)).toBeGreaterThan(0.1);
    expect(maxAbsDiff(last, shifted.logits[0]![6]!)).toBeLessThan(1e-4);
  });

  it('external (non-sparse) weights are the seeded random weights, streamed to one sidecar', async () => {
    const path = join(tmp, 'llama-external', 'model.onnx');
    const saved = writeLlamaModel(TINY_LLAMA, { kind: 'external', path: 'weights.bin', sparse: false, seed: 7 }, path);
    expect(saved.externalFiles).toEqual([{ location: 'weights.bin', how: 'referenced' }]);
    const external = await Decoder.open(path, TINY_LLAMA, 'float32');
    const [a, b] = [await llama.run(prefill(PADDED, 7), null), await external.run(prefill(PADDED, 7), null)];
    for (let r = 0; r < 2; r++) expect(maxAbsDiff(a.logits[r]![6]!, b.logits[r]![6]!)).toBe(0);
  });
});

describe('genai form (onnxruntime-genai builder shape)', () => {
  const fixture = BUILDER_FIXTURES.find((f) => f.dir === 'genai-tiny')!;

  it('uses the fused ORT ops in the genai builder layout: one attention bias, norms chained through SkipSimplifiedLayerNormalization', () => {
    const model = buildGenaiDecoder(fixture.config, fixture.weights);
    const count = (op: string, domain: string) => [...model.graph.nodes].filter((n) => n.opType === op && n.domain === domain).length;
    const layers = fixture.config.numLayers;
    expect(count('SimplifiedLayerNormalization', '')).toBe(1);
    expect(count('SkipSimplifiedLayerNormalization', 'com.microsoft')).toBe(2 * layers);
    expect(count('RotaryEmbedding', 'com.microsoft')).toBe(2 * layers);
    expect(count('MultiHeadAttention', 'com.microsoft')).toBe(layers);
    expect(count('Where', '')).toBe(1);
    expect(count('Softmax', '')).toBe(0);
    const mha = model.graph.nodes.find((n) => n.opType === 'MultiHeadAttention')!;
    expect(mha.inputs.map((v) => v?.name ?? '')).toEqual([
      expect.stringContaining('q_rotary'),
      expect.stringContaining('k_rotary'),
      expect.stringContaining('v_proj'),
      '',
      '',
      expect.stringContaining('attn_mask'),
      'past_key_values.0.key',
      'past_key_values.0.value',
    ]);
    expect(model.graph.outputs.map((v) => [v.name, v.dtype])).toContainEqual(['logits', DataType.FLOAT16]);
  });

  it('agrees with the Llama form built from the same weights within fp16 tolerance, prefill and decode, batch 1 and left-padded batch 2', async () => {
    const llamaPath = join(tmp, 'llama-mha', 'model.onnx');
    writeLlamaModel(fixture.config, fixture.weights, llamaPath);
    const llama = await Decoder.open(llamaPath, fixture.config, 'float32');
    const genai = await Decoder.open(join(FIXTURES_DIR, fixture.dir, 'model.onnx'), fixture.config, 'float16');
    let worst = 0;
    for (const tokens of [[PROMPT], PADDED]) {
      const [lp, gp] = [await llama.run(prefill(tokens, 6), null), await genai.run(prefill(tokens, 6), null)];
      const [ld, gd] = [await llama.run(decode(tokens, 6), lp), await genai.run(decode(tokens, 6), gp)];
      tokens.forEach((row, b) => {
        row.slice(0, 6).forEach((t, s) => {
          if (t !== 0) worst = Math.max(worst, maxAbsDiff(lp.logits[b]![s]!, gp.logits[b]![s]!));
        });
        worst = Math.max(worst, maxAbsDiff(ld.logits[b]![0]!, gd.logits[b]![0]!));
      });
    }
    expect(worst).toBeLessThan(2e-2);
  });
});

describe('checked-in builder fixtures', () => {
  it('fixtures/genai-tiny and fixtures/llama-builder-tiny are byte for byte what build-fixtures.ts writes', () => {
    const root = join(tmp, 'rebuilt');
    buildFixtures(root);
    for (const { dir } of BUILDER_FIXTURES) {
      const files = readdirSync(join(root, dir)).sort();
      expect(readdirSync(join(FIXTURES_DIR, dir)).sort(), dir).toEqual(files);
      for (const f of files) {
        expect(
          readFileSync(join(root, dir, f)).equals(readFileSync(join(FIXTURES_DIR, dir, f))),
          `${dir}/${f} differs: run npx tsx fixtures/build-fixtures.ts`,
        ).toBe(true);
      }
    }
  });

  it('share their weights: every tensor of the same name and shape is the fp32 one rounded to fp16', () => {
    const llama = loadModel(join(FIXTURES_DIR, 'llama-builder-tiny', 'model.onnx')).graph.initializers;
    const genai = loadModel(join(FIXTURES_DIR, 'genai-tiny', 'model.onnx')).graph.initializers;
    const shared = [...llama.values()].filter((v) => /weight$/.test(v.name) && `${genai.get(v.name)?.shape}` === `${v.shape}`);
    expect(shared.map((v) => v.name)).toEqual(expect.arrayContaining(['model.embed_tokens.weight', 'model.layers.2.mlp.down_proj.weight', 'lm_head.weight']));
    expect(shared.length).toBe(3 + 3 * 7);
    for (const v of shared) {
      const half = new Uint16Array(genai.get(v.name)!.initializer!.bytes().slice().buffer);
      expect(Array.from(v.initializer!.toArray() as Float32Array, floatToHalf), v.name).toEqual(Array.from(half));
    }
  });

  it('stay small enough to commit (< 1 MB each)', () => {
    for (const { dir } of BUILDER_FIXTURES) {
      const bytes = readdirSync(join(FIXTURES_DIR, dir)).reduce((a, f) => a + statSync(join(FIXTURES_DIR, dir, f)).size, 0);
      expect(bytes, dir).toBeLessThan(1 << 20);
    }
  });
});

describe('scale: 7B-shaped graphs with sparse external weights', () => {
  const LLAMA_7B = { hiddenSize: 4096, numLayers: 32, numHeads: 32, intermediateSize: 11008, vocabSize: 32000, maxPositions: 4096 };

  // Parameter counts: Llama-2-7B's 6.74B, and the same with 8 kv heads.
  it.each([
    ['llama, 32 kv heads', 'llama', 32, 6_738_415_616],
    ['llama, 8 kv heads (GQA)', 'llama', 8, 5_933_109_248],
    ['genai, 32 kv heads', 'genai', 32, 6_738_415_616],
  ] as const)('%s: builds and saves; the sidecar has its full apparent size and allocates almost no disk', (_, form, kvHeads, params) => {
    const cfg: DecoderConfig = { ...LLAMA_7B, numKvHeads: kvHeads };
    const path = join(tmp, `7b-${form}-${kvHeads}`, 'model.onnx');
    const write = form === 'llama' ? writeLlamaModel : writeGenaiModel;
    const saved = write(cfg, { kind: 'external', path: 'model.onnx.data', sparse: true }, path);
    expect(saved.externalFiles).toEqual([{ location: 'model.onnx.data', how: 'referenced' }]);

    const elem = form === 'llama' ? DataType.FLOAT : DataType.FLOAT16;
    const specs = decoderWeightSpecs(resolveConfig(cfg));
    expect(specs.reduce((a, s) => a + s.dims.reduce((x, y) => x * y, 1), 0)).toBe(params);
    const sidecar = statSync(join(tmp, `7b-${form}-${kvHeads}`, 'model.onnx.data'));
    expect(sidecar.size).toBe(sidecarLayout(specs, elem).size);
    expect(sidecar.size).toBeGreaterThanOrEqual(params * (elem === DataType.FLOAT ? 4 : 2));
    expect(sidecar.blocks * 512).toBeLessThan(1 << 20);
    expect(saved.bytes).toBeLessThan(4 << 20);

    const loaded = loadModel(path);
    expect(loaded.graph.initializers.get('lm_head.weight')!.initializer!.isExternal).toBe(true);
    expect(loaded.graph.outputs.map((v) => v.name)).toHaveLength(1 + 2 * 32);
  });
});

describe('fused GPT-2 form (ORT transformers optimizer layout)', () => {
  const cfg: DecoderConfig = { hiddenSize: 32, numLayers: 3, numHeads: 4, numKvHeads: 4, intermediateSize: 64, vocabSize: 512, maxPositions: 64 };
  let path: string;
  beforeAll(() => {
    path = join(tmp, 'gpt2-fused', 'model.onnx');
    writeFusedGpt2Model(cfg, { kind: 'external', path: 'weights.bin', sparse: false, seed: 5 }, path);
  });

  it('uses the fused ops with skip-norms across layer boundaries, and modc finds 3 Attention layers with combined caches', () => {
    const model = loadModel(path);
    const ops = model.graph.nodes.map((n) => n.opType);
    expect(ops.filter((o) => o === 'Attention')).toHaveLength(3);
    expect(ops.filter((o) => o === 'SkipLayerNormalization')).toHaveLength(6);
    expect(ops.filter((o) => o === 'EmbedLayerNormalization')).toHaveLength(1);
    expect(ops.filter((o) => o === 'FastGelu')).toHaveLength(3);
    const s = analyzeDecoder(model);
    expect(s.layers.map((l) => [l.attention.form, l.kv?.layout])).toEqual(Array(3).fill(['Attention', 'combined-2BHTD']));
  });

  it('prefill of 6 then one step gives the last logits of a prefill of 7; a left-padded row gives its unpadded logits', async () => {
    const a = await ModSession.create(path);
    const b = await ModSession.create(path);
    const full = lastPosition(await a.forward([PROMPT]))[0]!;
    await b.forward([PROMPT.slice(0, 6)]);
    const stepped = lastPosition(await b.step([PROMPT[6]!]))[0]!;
    expect(maxAbsDiff(full, stepped)).toBeLessThan(1e-4);
    // Row 0 is PROMPT's last 5 tokens, left-padded to 7 by the session: the padding must not be seen.
    const padded = a.lastReal(await a.forward([PROMPT.slice(2), PADDED[1]!]))[0]!;
    const alone = lastPosition(await b.forward([PROMPT.slice(2)]))[0]!;
    expect(maxAbsDiff(padded, alone)).toBeLessThan(1e-4);
    // ... and the logits depend on the tokens (not flat).
    expect(maxAbsDiff(full, alone)).toBeGreaterThan(1e-3);
    await a.session.release();
    await b.session.release();
  });
});
