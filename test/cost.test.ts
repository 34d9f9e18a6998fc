/**
 * The cost model against hand counts written from each fixture's dimensions (fixtures/torch/export.py,
 * fixtures/build-fixtures.ts, the ORT fixtures' genai_config.json), not from the code's output.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { denseUsage, executedMacs, kvElements, modelCosts, readCosts, type ModelCosts } from '../compiler/analysis/cost.js';
import { loadModel } from '../compiler/core/io/load.js';
import { runPipeline } from '../compiler/passes/pass-manager.js';
import { planRouting } from '../compiler/routing/routing-plan.js';
import { modPipeline } from '../compiler/passes/pipeline.js';
import { ROOT, fixture } from './helpers.js';

const costsOf = (path: string) => modelCosts(analyzeDecoder(loadModel(path)));

// llama-tiny: H 64, 4 heads of 16, 2 KV heads, MLP 128 (gate, up, down), vocab 512, 3 layers.
const H = 64,
  HEADS = 4,
  HD = 16,
  KVH = 2,
  I = 128,
  V = 512;
const LLAMA_ATTENTION = H * HEADS * HD + 2 * H * KVH * HD + HEADS * HD * H; // q, k, v, o
const LLAMA_MLP = 3 * H * I;
const PAIR = 2 * HEADS * HD;

describe('MACs per token and per (query, key) pair', () => {
  it('llama-tiny (unfused, GQA by Expand, gated MLP)', () => {
    const c = costsOf(join(ROOT, 'fixtures/llama-tiny/model.onnx'));
    expect(c).toMatchObject({ hiddenSize: H, vocabSize: V, router: H, lmHead: H * V });
    expect(c.layers).toEqual([0, 1, 2].map((layer) => ({ layer, attention: LLAMA_ATTENTION, attentionPair: PAIR, mlp: LLAMA_MLP, kvPerToken: 2 * KVH * HD })));
  });

  it('gpt2-tiny (packed QKV, 4H MLP)', () => {
    const c = costsOf(join(ROOT, 'fixtures/gpt2-tiny/model.onnx'));
    expect(c.layers[1]).toEqual({ layer: 1, attention: H * 3 * H + H * H, attentionPair: 2 * H, mlp: 2 * H * 4 * H, kvPerToken: 2 * H });
  });

  it('neox-tiny (parallel residual: the MLP branch is told apart from attention)', () => {
    const c = costsOf(join(ROOT, 'fixtures/neox-tiny/model.onnx'));
    expect(c.layers[2]).toMatchObject({ attention: H * 3 * H + H * H, mlp: 2 * H * 4 * H });
  });

  it('genai-tiny (MultiHeadAttention, external fp16 weights: shapes only)', () => {
    const c = costsOf(join(ROOT, 'fixtures/genai-tiny/model.onnx'));
    expect(c.layers[0]).toMatchObject({ attention: 4 * H * H, mlp: 3 * H * I, attentionPair: PAIR, kvPerToken: 2 * H });
  });

  it('quantized forms (QDQ, MatMulNBits, MatMulInteger): the same MACs as the float weights they stand for', () => {
    // fixtures/build-fixtures.ts forms: hidden 32, 4 heads of 8, 2 KV heads, MLP 64 (gate, up, down), vocab 256.
    const h = 32,
      hd = 8;
    for (const form of ['forms-qdq-tiny', 'forms-nbits-tiny', 'forms-integer-tiny']) {
      const c = costsOf(fixture(form));
      expect(c.layers[1], form).toEqual({
        layer: 1,
        attention: h * 4 * hd + 2 * h * 2 * hd + 4 * hd * h,
        attentionPair: 2 * 4 * hd,
        mlp: 3 * h * 64,
        kvPerToken: 2 * 2 * hd,
      });
    }
  });

  it('forms-fused-gpt2-tiny (the fused Attention op reads the QKV weight)', () => {
    // hidden 32, 4 heads of 8, vocab 1000: QKV [32, 96] in Attention, output [32, 32], MLP 32 -> 128 -> 32.
    const c = costsOf(fixture('forms-fused-gpt2-tiny'));
    expect(c).toMatchObject({ hiddenSize: 32, lmHead: 32 * 1000 });
    expect(c.layers[0]).toEqual({ layer: 0, attention: 32 * 96 + 32 * 32, attentionPair: 2 * 32, mlp: 2 * 32 * 128, kvPerToken: 2 * 32 });
  });
});

describe('executed MACs of a row', () => {
  const costs: ModelCosts = costsOf(join(ROOT, 'fixtures/llama-tiny/model.onnx'));
  const n = 10;
  const denseHand = 3 * (LLAMA_ATTENTION + LLAMA_MLP) * n + (3 * PAIR * (n * (n + 1))) / 2 + H * V * n;

  it('dense: every part on every token, n(n+1)/2 causal pairs per layer, lm_head', () => {
    expect(executedMacs(costs, denseUsage(costs, n))).toBe(denseHand);
    expect(kvElements(costs, denseUsage(costs, n))).toBe(3 * n * 2 * KVH * HD);
  });

  it('routed: a part runs on its selected tokens, pairs among them, a router per routed part on every token', () => {
    // layer 0 dense; layer 1 block-routed, 4 tokens; layer 2 attention on 3 tokens and MLP on 6, each routed.
    const usage = {
      tokens: n,
      layers: [
        { attention: n, mlp: n, routers: 0 },
        { attention: 4, mlp: 4, routers: 1 },
        { attention: 3, mlp: 6, routers: 2 },
      ],
    };
    const hand =
      (LLAMA_ATTENTION + LLAMA_MLP) * n +
      PAIR * 55 +
      (LLAMA_ATTENTION + LLAMA_MLP) * 4 +
      PAIR * 10 +
      H * n +
      LLAMA_ATTENTION * 3 +
      PAIR * 6 +
      LLAMA_MLP * 6 +
      2 * H * n +
      H * V * n;
    expect(executedMacs(costs, usage)).toBe(hand);
    expect(kvElements(costs, usage)).toBe((n + 4 + 3) * 2 * KVH * HD);
  });
});

describe('record-costs', () => {
  it("the MoD pipeline records the original model's costs in modc.costs", () => {
    const path = join(ROOT, 'fixtures/llama-tiny/model.onnx');
    const model = loadModel(path);
    const plan = planRouting({ numLayers: 3, hiddenSize: H, routers: { kind: 'random', seed: 1 }, schedule: 'every-other' });
    const records = runPipeline(model, modPipeline({ plan }));
    expect(records[0]!.pass).toBe('record-costs');
    expect(readCosts(model)).toEqual(costsOf(path));
  });
});
