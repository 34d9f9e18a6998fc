/**
 * MLP parts with a linear surrogate (SPEC.md, "MLP routed with a surrogate"): the router file's
 * `router.{l}.mlp.surrogate.*` tensors, the equivalence anchor (every token selected: the
 * surrogate runs on no token and the compiled model is the original), random surrogates at
 * top-k capacity 0.5 and MLPs replaced by their surrogate (capacity 0) against the MoD reference
 * executor, and eval's count of the surrogates' multiply-accumulates against a hand count.
 * (The torch oracle's surrogate cases are in test/oracle.test.ts.)
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { evaluate } from '../compiler/apps/eval/index.js';
import { verifyCompiled, worstReal } from '../compiler/apps/verify/verify.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { mulberry32 } from '../compiler/core/random.js';
import { readRoutingMetadata } from '../compiler/metadata/routing-metadata.js';
import { compile } from '../compiler/passes/compile.js';
import { allPassRouters, loadRouterFile, randomRouters, type Surrogate, writeRouterFile } from '../compiler/routing/router-weights.js';
import { planRouting, type RoutingPlan } from '../compiler/routing/routing-plan.js';
import { lastPosition, ModSession } from '../compiler/runtime/session.js';
import { expectOneLineError, fixture, runCli, tempDir } from './helpers.js';

const tmp = tempDir('modc-surrogate');
let counter = 0;

function randomSurrogate(H: number, rank: number, seed: number): Surrogate {
  const next = mulberry32(seed);
  return {
    rank,
    a: Float32Array.from({ length: H * rank }, () => (next() * 2 - 1) / Math.sqrt(H)),
    b: Float32Array.from({ length: rank * H }, () => (next() * 2 - 1) / Math.sqrt(rank)),
    bias: Float32Array.from({ length: H }, () => (next() * 2 - 1) * 0.1),
  };
}

function compileTo(source: string, plan: RoutingPlan): string {
  const model = loadModel(source);
  compile(model, { plan });
  const path = join(tmp, `m${counter++}`, 'model.onnx');
  saveModel(model, path);
  return path;
}

describe('router file surrogate tensors', () => {
  const H = 8;
  const model = { hiddenSize: H, numLayers: 3 };

  it('reads and writes them in F32, F16 and BF16: a routed MLP part with one, and an MLP replaced by one (no router)', () => {
    const sur = randomSurrogate(H, 3, 1);
    const routed = { ...randomRouters([0], H, 2, 'mlp')[0]!, surrogate: sur };
    const replaced = { layer: 2, part: 'mlp' as const, surrogate: randomSurrogate(H, 2, 3) };
    for (const dtype of ['F32', 'F16', 'BF16'] as const) {
      const path = join(tmp, `file-${dtype}.safetensors`);
      writeRouterFile(path, [routed], undefined, { dtype, replaced: [replaced] });
      const header = JSON.parse(
        readFileSync(path)
          .subarray(8, 8 + Number(readFileSync(path).readBigUInt64LE(0)))
          .toString(),
      );
      expect(header['router.0.mlp.surrogate.a']).toMatchObject({ dtype, shape: [H, 3] });
      expect(header['router.0.mlp.surrogate.b']).toMatchObject({ dtype, shape: [3, H] });
      expect(header['router.0.mlp.surrogate.bias']).toMatchObject({ dtype, shape: [H] });
      expect(header['router.2.mlp.surrogate.a']).toMatchObject({ shape: [H, 2] });
      expect(header['router.2.mlp.weight']).toBeUndefined();
      const file = loadRouterFile(path, model);
      const tol = dtype === 'F32' ? 0 : dtype === 'F16' ? 1e-3 : 1e-2;
      expect(file.routers).toHaveLength(1);
      const got = file.routers[0]!.surrogate!;
      expect(got.rank).toBe(3);
      got.a.forEach((v, i) => expect(Math.abs(v - sur.a[i]!)).toBeLessThanOrEqual(tol));
      got.b.forEach((v, i) => expect(Math.abs(v - sur.b[i]!)).toBeLessThanOrEqual(tol));
      expect(file.replaced.map((r) => [r.layer, r.part, r.surrogate.rank])).toEqual([[2, 'mlp', 2]]);
      // planRouting keeps both: the routed part with its surrogate, the replaced part without a router.
      const plan = planRouting({ ...model, routers: { kind: 'file', path } });
      expect(plan.layers.map((l) => [l.layer, l.part, l.router.surrogate?.rank])).toEqual([[0, 'mlp', 3]]);
      expect(plan.replaced?.map((r) => r.layer)).toEqual([2]);
      expect(plan.unconverted.map((u) => u.layer)).toEqual([1]);
    }
  });

  it('refuses a surrogate outside an MLP part, a missing or misshapen tensor, and one beside a block router', () => {
    const write = (tensors: [string, number[]][]) => {
      const path = join(tmp, `bad${counter++}.safetensors`);
      const header: Record<string, unknown> = {};
      let offset = 0;
      for (const [name, shape] of tensors) {
        const bytes = 4 * shape.reduce((a, d) => a * d, 1);
        header[name] = { dtype: 'F32', shape, data_offsets: [offset, offset + bytes] };
        offset += bytes;
      }
      const json = Buffer.from(JSON.stringify(header));
      const len = Buffer.alloc(8);
      len.writeBigUInt64LE(BigInt(json.length));
      writeFileSync(path, Buffer.concat([len, json, Buffer.alloc(offset)]));
      return path;
    };
    const full = (l: number, r = 2): [string, number[]][] => [
      [`router.${l}.mlp.surrogate.a`, [H, r]],
      [`router.${l}.mlp.surrogate.b`, [r, H]],
      [`router.${l}.mlp.surrogate.bias`, [H]],
    ];
    expect(() => loadRouterFile(write([['router.0.attn.surrogate.a', [H, 2]]]), model)).toThrow(/surrogate belongs to an MLP part only/);
    expect(() => loadRouterFile(write(full(0).slice(0, 2)), model)).toThrow(/has no tensor 'router\.0\.mlp\.surrogate\.bias'/);
    expect(() =>
      loadRouterFile(
        write([
          ['router.0.mlp.surrogate.a', [H, 2]],
          ['router.0.mlp.surrogate.b', [3, H]],
          ['router.0.mlp.surrogate.bias', [H]],
        ]),
        model,
      ),
    ).toThrow(/'router\.0\.mlp\.surrogate\.b' has shape \[3, 8\], expected \[2, 8\]/);
    expect(() => loadRouterFile(write([...full(1), ['router.1.weight', [H]], ['router.1.bias', []]]), model)).toThrow(
      /'router\.1\.mlp\.surrogate\.a' routes a sub-layer of layer 1, whose whole block/,
    );
    expect(() => loadRouterFile(write(full(3)), model)).toThrow(/is for layer 3, but the model has 3 layers/);
  });

  it('modc compile refuses a bad surrogate file in one line', async () => {
    const path = join(tmp, 'wide.safetensors');
    writeRouterFile(path, [], undefined, { replaced: [{ layer: 0, part: 'mlp', surrogate: randomSurrogate(12, 2, 1) }] });
    const res = await runCli('compile', fixture('llama-tiny'), '--routers', path, '-o', join(tmp, 'never.onnx'));
    expectOneLineError(res, 1, /router\.0\.mlp\.surrogate\.a' has shape \[12, 2\], expected \[64, rank\]/);
  });
});

/** Per model: every layer's MLP routed with a random router and surrogate; layer 1 replaced in the mixed plan. */
function plans(source: string): { H: number; L: number; allPass: RoutingPlan; random: (gated: boolean) => RoutingPlan; replacedOnly: RoutingPlan } {
  const s = analyzeDecoder(loadModel(source));
  const H = s.hiddenSize;
  const L = s.layers.length;
  const layers = Array.from({ length: L }, (_, l) => l);
  const sur = (l: number) => randomSurrogate(H, 4 + 2 * l, 100 + l);
  return {
    H,
    L,
    allPass: {
      mode: 'threshold',
      gated: false,
      layers: allPassRouters(layers, H, 'mlp').map((router, l) => ({
        layer: l,
        part: 'mlp',
        router: { ...router, surrogate: sur(l) },
        threshold: 0.5,
        capacity: 1,
      })),
      unconverted: [],
    },
    random: (gated) => ({
      mode: 'topk',
      gated,
      layers: randomRouters(layers, H, 7, 'mlp')
        .filter((r) => r.layer !== 1)
        .map((router) => ({ layer: router.layer, part: 'mlp', router: { ...router, surrogate: sur(router.layer) }, threshold: 0.5, capacity: 0.5 })),
      replaced: [{ layer: 1, part: 'mlp', surrogate: sur(1) }],
      unconverted: [],
    }),
    replacedOnly: {
      mode: 'threshold',
      gated: false,
      layers: [],
      replaced: layers.map((l) => ({ layer: l, part: 'mlp' as const, surrogate: sur(l) })),
      unconverted: [],
    },
  };
}

const PROMPT = [
  [5, 6, 7, 8, 9, 10, 11, 12],
  [21, 22, 23],
  [31, 32, 33, 34, 35],
];

describe.each([
  ['llama-tiny', 'left'],
  ['neox-tiny', 'left'],
  ['forms-fused-gpt2-tiny', 'left'],
  ['forms-gqa-fp16-tiny', 'right'],
] as const)('%s: surrogates', (name, pad) => {
  const source = fixture(name);
  const p = plans(source);
  const fp16 = name.includes('fp16');
  const tolerance = fp16 ? 1e-2 : 1e-4;

  it('all-pass routers with surrogates reproduce the original (prefill and decode, batch 3 with padding)', async () => {
    const compiled = await ModSession.create(compileTo(source, p.allPass));
    const original = await ModSession.create(source);
    let worst = worstReal(await compiled.forward(PROMPT, { pad }), await original.forward(PROMPT, { pad }), PROMPT, pad);
    for (const step of [
      [40, 41, 42],
      [43, 44, 45],
    ]) {
      const a = lastPosition(await compiled.step(step));
      const b = lastPosition(await original.step(step));
      a.forEach((row, r) => row.forEach((v, i) => (worst = Math.max(worst, Math.abs(v - b[r]![i]!)))));
    }
    expect(worst).toBeLessThanOrEqual(tolerance);
  });

  it.each([false, true])('random routers at top-k 0.5 with surrogates, one MLP replaced, gated %s: verify passes against the reference', async (gated) => {
    const path = compileTo(source, p.random(gated));
    const meta = readRoutingMetadata(loadModel(path))!;
    expect(meta.layers.map((l) => [l.layer, l.surrogate?.rank])).toEqual(p.random(gated).layers.map((l) => [l.layer, l.router.surrogate!.rank]));
    expect(meta.replaced?.map((r) => [r.layer, r.surrogate.rank, r.surrogate.macs])).toEqual([[1, 6, 2 * p.H * 6]]);
    const report = await verifyCompiled(source, path, { prompt: PROMPT, steps: 3, pad });
    expect(report.checks.map((c) => [c.name, c.passed])).toEqual([
      ['semantics', true],
      ['anchor', true],
    ]);
    // The routing matters: far from the original.
    const a = await ModSession.create(path);
    const o = await ModSession.create(source);
    expect(worstReal(await a.forward(PROMPT, { pad }), await o.forward(PROMPT, { pad }), PROMPT, pad)).toBeGreaterThan(0.05);
  });

  it('every MLP replaced by its surrogate (no router): verify passes, and the MLP weights are gone', async () => {
    const path = compileTo(source, p.replacedOnly);
    const report = await verifyCompiled(source, path, { prompt: PROMPT, steps: 2, pad });
    expect(report.passed).toBe(true);
    const model = loadModel(path);
    expect(readRoutingMetadata(model)!.layers).toEqual([]);
    // The MLP's weight multiplications are gone (what stays of it is the norm computing u).
    const matmulWeights = analyzeDecoder(loadModel(source)).layers.flatMap((l) =>
      l.mlpNodes.filter((n) => ['MatMul', 'Gemm', 'FusedMatMul'].includes(n.opType)).flatMap((n) => n.inputs.filter((v) => v?.isConstant).map((v) => v!.name)),
    );
    expect(matmulWeights.length).toBeGreaterThanOrEqual(2 * p.L);
    const left = new Set([...model.graph.initializers.keys()]);
    expect(matmulWeights.filter((w) => left.has(w))).toEqual([]);
  });
});

describe("eval's compute count with surrogates (llama-tiny, by hand)", () => {
  // llama-tiny: H 64, 4 heads and 2 KV heads of 16, SwiGLU 128, vocab 512, 3 layers.
  const H = 64;
  const ATTENTION = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64;
  const PAIR = 2 * 4 * 16;
  const MLP = 3 * 64 * 128;
  const LM_HEAD = 64 * 512;
  const dense = (n: number) => n * (LM_HEAD + 3 * (ATTENTION + MLP)) + 3 * PAIR * ((n * (n + 1)) / 2);
  const rows = [Array.from({ length: 40 }, (_, i) => (i * 7) % 512), Array.from({ length: 23 }, (_, i) => (i * 11 + 3) % 512)];
  const p = plans(fixture('llama-tiny'));

  it('every MLP replaced: no MLP, no router, each surrogate on every token', async () => {
    const r = await evaluate(compileTo(fixture('llama-tiny'), p.replacedOnly), rows);
    const ranks = p.replacedOnly.replaced!.map((x) => x.surrogate.rank);
    const executed = rows.reduce((a, row) => a + dense(row.length) - row.length * 3 * MLP + row.length * ranks.reduce((x, rank) => x + 2 * H * rank, 0), 0);
    expect(r.macs.dense).toBe(rows.reduce((a, row) => a + dense(row.length), 0));
    expect(r.macs.executed).toBe(executed);
    expect(r.layers.map((l) => [l.layer, l.part, l.selectedFraction, l.surrogate])).toEqual(ranks.map((rank, l) => [l, 'mlp', 0, { rank, fraction: 1 }]));
  });

  it('routed MLPs with surrogates: the router on every token, the MLP on the selected ones, the surrogate on the others', async () => {
    const plan = p.random(false);
    const r = await evaluate(compileTo(fixture('llama-tiny'), plan), rows);
    const tokens = rows.reduce((a, row) => a + row.length, 0);
    let executed = rows.reduce((a, row) => a + dense(row.length), 0);
    for (const l of r.layers) {
      const rank = l.layer === 1 ? plan.replaced![0]!.surrogate.rank : plan.layers.find((x) => x.layer === l.layer)!.router.surrogate!.rank;
      const selected = Math.round(l.selectedFraction * tokens);
      if (l.layer !== 1) expect(selected).toBeGreaterThan(0);
      executed += -(tokens - selected) * MLP + (tokens - selected) * 2 * H * rank + (l.layer === 1 ? 0 : tokens * H);
      expect(l.surrogate).toEqual({ rank, fraction: 1 - l.selectedFraction });
    }
    expect(r.macs.executed).toBe(executed);
  });
});
