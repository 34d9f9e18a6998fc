/**
 * modc eval: NLL against logits from ModSession.forward, and the compute / KV-cache fractions and
 * selected fractions against hand counts from the fixture's dimensions, on models whose
 * selections are known (top-k selects ceil(c*n) tokens of each row whatever the scores).
 */
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { readDataset } from '../compiler/apps/data/index.js';
import { evaluate } from '../compiler/apps/eval/index.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { ModSession } from '../compiler/runtime/session.js';
import { ROOT, fixture, runCli, tempDir } from './helpers.js';

const LLAMA = join(ROOT, 'fixtures/llama-tiny/model.onnx');
const QWEN = fixture('forms-gqa-fp16-tiny');
const LINES = [
  [1, 2, 3, 4, 5, 6, 7, 8],
  [9, 10, 11, 12, 13],
  [5, 6, 7],
  [300, 511, 0, 42, 42, 42, 7, 100, 200, 17],
];

// llama-tiny, by hand: H 64, 4 heads of 16, 2 KV heads, MLP 128 (gate, up, down), vocab 512, 3 layers.
const H = 64,
  V = 512,
  L = 3;
const ATTENTION = H * 64 + 2 * H * 32 + 64 * H;
const MLP = 3 * H * 128;
const PAIR = 2 * 4 * 16;
const pairs = (k: number) => (k * (k + 1)) / 2;
const denseMacs = (n: number) => L * ((ATTENTION + MLP) * n + PAIR * pairs(n)) + H * V * n;
const sum = (xs: number[]) => xs.reduce((a, x) => a + x, 0);

/** The mean NLL of each line's next tokens, from one ModSession.forward per line. */
async function referenceNll(path: string, lines: number[][], opts: Parameters<typeof ModSession.create>[1] = {}): Promise<number> {
  const s = await ModSession.create(path, opts);
  let total = 0;
  let count = 0;
  for (const line of lines) {
    const { data, dims } = await s.forward([line]);
    const vocab = dims[2];
    for (let t = 0; t + 1 < line.length; t++) {
      const row = Array.from(data.subarray(t * vocab, (t + 1) * vocab));
      const max = Math.max(...row);
      const logZ = max + Math.log(row.reduce((a, x) => a + Math.exp(x - max), 0));
      total += logZ - row[line[t + 1]!]!;
      count++;
    }
  }
  return total / count;
}

const dir = tempDir('modc-eval');
const compiled = {
  topk: join(dir, 'topk/model.onnx'),
  allPass: join(dir, 'all-pass/model.onnx'),
  threshold: join(dir, 'threshold/model.onnx'),
  qwen: join(dir, 'qwen/model.onnx'),
  attention: join(dir, 'attention/model.onnx'),
  mlp: join(dir, 'mlp/model.onnx'),
};

beforeAll(async () => {
  const quiet = async (...args: string[]) => expect((await runCli('compile', ...args)).code).toBe(0);
  await quiet(LLAMA, '-o', compiled.topk, '--router-init', 'random', '--routing', 'topk', '--capacity', '0.5', '--layers', '0,2');
  await quiet(LLAMA, '-o', compiled.allPass, '--router-init', 'all-pass');
  await quiet(LLAMA, '-o', compiled.threshold, '--router-init', 'random', '--seed', '3');
  await quiet(QWEN, '-o', compiled.qwen, '--router-init', 'random', '--seed', '5');
  for (const part of ['attention', 'mlp'] as const) {
    await quiet(LLAMA, '-o', compiled[part], '--router-init', 'random', '--routing', 'topk', '--capacity', '0.5', '--layers', '0,2', '--granularity', part);
  }
}, 120_000);

describe('NLL is the mean over every predicted token', () => {
  it('original model: agrees with ModSession.forward logits of each line', async () => {
    const r = await evaluate(LLAMA, LINES, { batchSize: 3 });
    expect(r.tokens).toBe(sum(LINES.map((l) => l.length - 1)));
    expect(r.inputTokens).toBe(sum(LINES.map((l) => l.length)));
    expect(Math.abs(r.nll - (await referenceNll(LLAMA, LINES)))).toBeLessThan(1e-3);
    expect(r.perplexity).toBeCloseTo(Math.exp(r.nll), 10);
  });

  it('reproduces the held-out NLL torch measured for the trained quality fixture', async () => {
    const dir = join(ROOT, 'fixtures/quality-lm');
    const torchNll = (JSON.parse(readFileSync(join(dir, 'train-log.json'), 'utf8')) as { evalNll: number }).evalNll; // 4 decimals
    const r = await evaluate(join(dir, 'model.onnx'), readDataset(join(dir, 'eval.jsonl'), { vocabSize: 256 }), { batchSize: 16 });
    expect(r.tokens).toBe(64 * 255);
    expect(Math.abs(r.nll - torchNll)).toBeLessThan(2e-4);
  }, 60_000);

  const BYTES = LINES.map((l) => l.map((id) => id % 256)); // the forms fixtures have 256 tokens
  it('other forms: a hybrid model with state layers, an inputs_embeds decoder with its embedding model', async () => {
    const hybrid = fixture('forms-hybrid-tiny');
    expect(Math.abs((await evaluate(hybrid, BYTES, { batchSize: 4 })).nll - (await referenceNll(hybrid, BYTES)))).toBeLessThan(1e-3);
    const embeds = fixture('forms-embeds-tiny');
    const r = await evaluate(embeds, BYTES, { batchSize: 4 });
    expect(
      Math.abs(r.nll - (await referenceNll(embeds, BYTES, { embeddings: { kind: 'model', path: join(dirname(embeds), 'embedding.onnx') } }))),
    ).toBeLessThan(1e-3);
  });

  it('compiled model (threshold routers, batched with padding on either side): agrees too', async () => {
    const ref = await referenceNll(compiled.threshold, LINES);
    for (const pad of ['left', 'right'] as const) {
      const r = await evaluate(compiled.threshold, LINES, { batchSize: 4, pad });
      expect(Math.abs(r.nll - ref)).toBeLessThan(1e-3);
      expect(r.layers.some((l) => l.selectedFraction > 0 && l.selectedFraction < 1)).toBe(true);
    }
  });

  it('GroupQueryAttention model, compiled (right padding): agrees too', async () => {
    const r = await evaluate(compiled.qwen, LINES, { batchSize: 4 });
    expect(Math.abs(r.nll - (await referenceNll(compiled.qwen, LINES)))).toBeLessThan(1e-3);
  });
});

describe('compute and KV-cache fractions', () => {
  const ns = LINES.map((l) => l.length);

  it('an original model runs everything: 1.0, every layer dense', async () => {
    const r = await evaluate(LLAMA, LINES);
    expect(r.computeFraction).toBe(1);
    expect(r.kvFraction).toBe(1);
    expect(r.macs.dense).toBe(sum(ns.map(denseMacs)));
    expect(r.layers).toEqual([0, 1, 2].map((layer) => ({ layer, part: 'block', routed: false, selectedFraction: 1 })));
    expect(r.routing).toBeNull();
  });

  it('all-pass routers: every token selected; the only extra work is the three routers', async () => {
    const r = await evaluate(compiled.allPass, LINES);
    expect(r.layers.map((l) => l.selectedFraction)).toEqual([1, 1, 1]);
    expect(r.kvFraction).toBe(1);
    const dense = sum(ns.map(denseMacs));
    expect(r.macs.dense).toBe(dense);
    expect(r.computeFraction).toBeCloseTo((dense + L * H * sum(ns)) / dense, 12);
    expect(r.computeFraction - 1).toBeLessThan(0.002);
  });

  it('top-k 0.5 on layers 0 and 2: ceil(n/2) tokens run those layers, and the fractions follow by hand', async () => {
    const r = await evaluate(compiled.topk, LINES, { batchSize: 2 });
    const ks = ns.map((n) => Math.ceil(n / 2)); // 4, 3, 2, 5
    const routedLayer = (n: number, k: number) => (ATTENTION + MLP) * k + PAIR * pairs(k) + H * n;
    const denseLayer = (n: number) => (ATTENTION + MLP) * n + PAIR * pairs(n);
    const executed = sum(ns.map((n, i) => 2 * routedLayer(n, ks[i]!) + denseLayer(n) + H * V * n));
    const dense = sum(ns.map(denseMacs));
    expect(r.macs).toEqual({ executed, dense });
    expect(r.computeFraction).toBeCloseTo(executed / dense, 12);
    expect(r.computeFraction).toBeLessThan(0.8);
    expect(r.kvFraction).toBeCloseTo((2 * sum(ks) + sum(ns)) / (3 * sum(ns)), 12);
    expect(r.layers).toEqual([
      { layer: 0, part: 'block', routed: true, selectedFraction: sum(ks) / sum(ns) },
      { layer: 1, part: 'block', routed: false, selectedFraction: 1 },
      { layer: 2, part: 'block', routed: true, selectedFraction: sum(ks) / sum(ns) },
    ]);
    expect(r.routing).toEqual({ mode: 'topk', gated: true });
  });

  it("sub-layer parts: an attention part counts its tokens' projections, pairs and KV; an MLP part its MLP only", async () => {
    // The top-k model's metadata rewritten to say layer 0 routes its attention and layer 2 its MLP, each
    // with the selection value named (the graph is unchanged: eval trusts modc.routing, which is the point).
    const model = loadModel(compiled.topk);
    const selectOf = (layer: number) =>
      model.graph.nodes.find((n) => n.opType === 'SelectTopK' && n.input(0)!.producer!.input(1)!.name === `modc.router.${layer}.weight`)!.outputs[0]!.name;
    const routing = {
      mode: 'topk',
      gated: true,
      layers: [
        { layer: 0, part: 'attention', selected: selectOf(0), threshold: 0.5, capacity: 0.5 },
        { layer: 2, part: 'mlp', selected: selectOf(2), threshold: 0.5, capacity: 0.5 },
      ],
    };
    model.metadataProps = model.metadataProps.map((p) => (p.key === 'modc.routing' ? { key: p.key, value: JSON.stringify(routing) } : p));
    const path = join(dir, 'parts/model.onnx');
    saveModel(model, path);

    const r = await evaluate(path, LINES);
    const ks = ns.map((n) => Math.ceil(n / 2));
    const executed = sum(
      ns.map((n, i) => {
        const k = ks[i]!;
        const layer0 = ATTENTION * k + PAIR * pairs(k) + MLP * n + H * n;
        const layer1 = (ATTENTION + MLP) * n + PAIR * pairs(n);
        const layer2 = ATTENTION * n + PAIR * pairs(n) + MLP * k + H * n;
        return layer0 + layer1 + layer2 + H * V * n;
      }),
    );
    expect(r.macs).toEqual({ executed, dense: sum(ns.map(denseMacs)) });
    expect(r.kvFraction).toBeCloseTo((sum(ks) + 2 * sum(ns)) / (3 * sum(ns)), 12);
    expect(r.layers.map((l) => [l.layer, l.part, l.routed])).toEqual([
      [0, 'attention', true],
      [1, 'block', false],
      [2, 'mlp', true],
    ]);
  });

  for (const part of ['attention', 'mlp'] as const) {
    it(`--granularity ${part}, top-k 0.5 on layers 0 and 2: only that part runs on ceil(n/2) tokens`, async () => {
      const r = await evaluate(compiled[part], LINES, { batchSize: 3 });
      const ks = ns.map((n) => Math.ceil(n / 2));
      const routedLayer = (n: number, k: number) =>
        part === 'attention' ? ATTENTION * k + PAIR * pairs(k) + MLP * n + H * n : ATTENTION * n + PAIR * pairs(n) + MLP * k + H * n;
      const denseLayer = (n: number) => (ATTENTION + MLP) * n + PAIR * pairs(n);
      const executed = sum(ns.map((n, i) => 2 * routedLayer(n, ks[i]!) + denseLayer(n) + H * V * n));
      expect(r.macs).toEqual({ executed, dense: sum(ns.map(denseMacs)) });
      // Skipping attention drops the token from that layer's cache; skipping the MLP keeps the cache full.
      expect(r.kvFraction).toBeCloseTo(part === 'attention' ? (2 * sum(ks) + sum(ns)) / (3 * sum(ns)) : 1, 12);
      expect(r.layers.map((l) => [l.layer, l.part, l.routed, l.selectedFraction])).toEqual([
        [0, part, true, sum(ks) / sum(ns)],
        [1, 'block', false, 1],
        [2, part, true, sum(ks) / sum(ns)],
      ]);
      expect(Math.abs(r.nll - (await referenceNll(compiled[part], LINES)))).toBeLessThan(1e-3);
    });
  }

  it('a model whose metadata does not name the selection values: found from the modc.Select nodes', async () => {
    const model = loadModel(compiled.attention);
    const routing = JSON.parse(model.metadataProps.find((p) => p.key === 'modc.routing')!.value!);
    routing.layers = routing.layers.map((l: object) => ({ ...l, selected: '' }));
    model.metadataProps = model.metadataProps.map((p) => (p.key === 'modc.routing' ? { key: p.key, value: JSON.stringify(routing) } : p));
    const path = join(dir, 'unnamed/model.onnx');
    saveModel(model, path);
    const [a, b] = [await evaluate(compiled.attention, LINES), await evaluate(path, LINES)];
    expect(b.macs).toEqual(a.macs);
    expect(b.layers).toEqual(a.layers);
  });

  it('batch size does not change the result', async () => {
    const a = await evaluate(compiled.threshold, LINES, { batchSize: 1 });
    const b = await evaluate(compiled.threshold, LINES, { batchSize: 4 });
    expect(Math.abs(a.nll - b.nll)).toBeLessThan(1e-5);
    expect(a.macs).toEqual(b.macs);
    expect(a.layers).toEqual(b.layers);
  });
});

describe('refusals', () => {
  it('a sequence longer than the model context, an id outside the vocabulary, no sequences', async () => {
    const gpt2 = join(ROOT, 'fixtures/gpt2-tiny/model.onnx');
    await expect(evaluate(gpt2, [Array(257).fill(1)])).rejects.toThrow(/sequence 1 has 257 tokens, more than the model's context of 256/);
    await expect(
      evaluate(LLAMA, [
        [1, 2],
        [3, 512],
      ]),
    ).rejects.toThrow(/sequence 2: token id 512 is outside the vocabulary \(0-511\)/);
    await expect(evaluate(LLAMA, [])).rejects.toThrow(/no sequences/);
    await expect(evaluate(QWEN, [[1, 2]], { pad: 'left' })).rejects.toThrow(/--pad left is not supported for this model: its GroupQueryAttention/);
  });
});
