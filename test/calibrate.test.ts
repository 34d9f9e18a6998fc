/**
 * modc calibrate: the closed-form fit, thresholds that select the requested fraction, determinism,
 * a router file that compiles with no other flag, one-line CLI errors (bounded memory: test/slow/calibrate-memory.test.ts).
 */
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { calibrate, type CalibrationResult } from '../compiler/apps/calibration/calibrate.js';
import { readDataset } from '../compiler/apps/data/index.js';
import { RidgeStats, solveRidge, thresholdKeeping } from '../compiler/apps/calibration/ridge.js';
import { routerFileMetadata, writeCalibratedRouters } from '../compiler/apps/calibration/router-file.js';
import { loadModel } from '../compiler/core/io/load.js';
import { ModReference } from '../compiler/apps/reference/mod-reference.js';
import { mulberry32 } from '../compiler/core/random.js';
import { readRoutingMetadata } from '../compiler/metadata/routing-metadata.js';
import { describeLayerPart, planRouting } from '../compiler/routing/routing-plan.js';
import { expectOneLineError, ROOT, runCli, tempDir } from './helpers.js';
import { HIDDEN, LAYERS, MODEL, VOCAB, writeData } from './calibrate-data.js';

describe('closed-form ridge fit', () => {
  it('recovers a known linear target from streamed statistics', () => {
    const d = 24;
    const next = mulberry32(7);
    const w = Float64Array.from({ length: d }, () => next() * 2 - 1);
    const b = 0.3;
    const stats = new RidgeStats(d);
    for (let batch = 0; batch < 10; batch++) {
      const n = 200;
      const x = Float32Array.from({ length: n * d }, () => (next() * 2 - 1) * (1 + (batch % 3)));
      const t = Array.from({ length: n }, (_, r) => {
        let v = b;
        for (let i = 0; i < d; i++) v += w[i]! * x[r * d + i]!;
        return v;
      });
      stats.add(
        x,
        Int32Array.from({ length: n }, (_, r) => r),
        [t],
      );
    }
    const fit = solveRidge(stats, 1e-9);
    for (let i = 0; i < d; i++) expect(fit.weight[i]).toBeCloseTo(w[i]!, 4);
    expect(fit.bias).toBeCloseTo(b, 4);
    expect(fit.r2).toBeGreaterThan(0.999999);
  });

  it('uses only the listed rows (padding excluded)', () => {
    const stats = new RidgeStats(2);
    const x = Float32Array.of(1, 0, 0, 1, 99, 99, 1, 1);
    stats.add(x, Int32Array.of(0, 1, 3), [[1, 2, 3]]);
    expect(stats.n).toBe(3);
    expect([...stats.sumX]).toEqual([2, 2]);
    expect(stats.targets[0]!.sumT).toBe(6);
  });
});

describe('modc calibrate on llama-tiny', () => {
  const dir = tempDir('modc-calibrate');
  const data = join(dir, 'calib.jsonl');
  const file = join(dir, 'routers.safetensors');
  let result: CalibrationResult;
  const opts = { targetCompute: 0.8, granularity: 'auto' as const, capacities: [0.75, 0.5], sensitivityTokens: 1024, seed: 3 };

  beforeAll(async () => {
    writeData(data, 48, 40, 11);
    result = await calibrate(MODEL, readDataset(data, { vocabSize: null }), opts);
    writeCalibratedRouters(file, result, routerFileMetadata(result, { path: data, tokens: result.report.tokens, sequences: result.report.sequences }));
  });

  it('meets the compute target on the calibration data', () => {
    expect(result.routers.length).toBeGreaterThan(0);
    expect(result.report.computeFraction).toBeLessThanOrEqual(0.8 + 0.01);
    expect(result.report.tokens).toBe(48 * 40);
  });

  it("each router's threshold selects its capacity on the calibration data (checked by the MoD reference executor)", async () => {
    const plan = planRouting({ numLayers: LAYERS, hiddenSize: HIDDEN, routers: { kind: 'file', path: file } });
    const ref = await ModReference.create(MODEL, { ...plan, mode: 'threshold' }, join(dir, 'ref'));
    const selected = new Map<string, number>();
    let tokens = 0;
    try {
      const rows = readDataset(data, { vocabSize: null });
      for (let i = 0; i < rows.length; i += 8) {
        const batch = rows.slice(i, i + 8);
        await ref.forward(batch);
        tokens += batch.reduce((a, r) => a + r.length, 0);
        for (const [layer, picks] of ref.selections.at(-1)!) selected.set(layer, (selected.get(layer) ?? 0) + picks.reduce((a, p) => a + p.length, 0));
      }
    } finally {
      await ref.release();
    }
    for (const r of result.routers) {
      const fraction = selected.get(describeLayerPart(r))! / tokens;
      expect(Math.abs(fraction - r.capacity)).toBeLessThan(0.03);
      expect(r.capacity).toBeLessThan(1);
    }
  });

  it('is deterministic for a seed', async () => {
    const again = await calibrate(MODEL, readDataset(data, { vocabSize: null }), opts);
    const second = join(dir, 'again.safetensors');
    writeCalibratedRouters(second, again, routerFileMetadata(again, { path: data, tokens: again.report.tokens, sequences: again.report.sequences }));
    expect(readFileSync(second).equals(readFileSync(file))).toBe(true);
  });

  it('writes a router file that planRouting reads with no other option and that compiles', async () => {
    const plan = planRouting({ numLayers: LAYERS, hiddenSize: HIDDEN, routers: { kind: 'file', path: file } });
    expect(plan.layers.map((l) => describeLayerPart(l))).toEqual(result.routers.map((r) => describeLayerPart(r)));
    expect(plan.gated).toBe(false);
    plan.layers.forEach((l, i) => {
      expect(l.capacity).toBeCloseTo(result.routers[i]!.capacity, 6);
      expect(l.router.bias).toBeCloseTo(result.routers[i]!.bias, 5);
      expect(l.threshold).toBe(0.5);
    });
    const header = JSON.parse(
      readFileSync(file)
        .subarray(8, 8 + Number(readFileSync(file).readBigUInt64LE(0)))
        .toString(),
    );
    const meta = JSON.parse(header.__metadata__.modc);
    expect(meta.mode).toBe('threshold');
    expect(meta.gated).toBe(false);
    expect(meta.layers.map((l: { layer: number; part: string }) => `${l.layer}.${l.part}`)).toEqual(result.routers.map((r) => `${r.layer}.${r.part}`));
    expect(meta.calibration.recipe.targetCompute).toBe(0.8);

    const out = join(dir, 'compiled.onnx');
    const res = await runCli('compile', MODEL, '--routers', file, '-o', out, '--quiet');
    expect(res.stderr).toBe('');
    expect(res.code).toBe(0);
    const routing = readRoutingMetadata(loadModel(out))!;
    expect(routing.gated).toBe(false);
    expect(routing.layers.map((l) => describeLayerPart(l))).toEqual(result.routers.map((r) => describeLayerPart(r)));
  });
});

describe('thresholds', () => {
  it('keep the requested fraction and equal no score, ties included', () => {
    const values = Float64Array.from([3, 1, 2, 2, 2, 5, 4, 0, 2, 6]);
    for (const keep of [0.1, 0.25, 0.5, 0.7, 0.9, 1]) {
      const t = thresholdKeeping(values, keep);
      expect(
        values.every((v) => v !== t),
        `keep ${keep}: threshold ${t}`,
      ).toBe(true);
      const kept = values.filter((v) => v >= t).length;
      // Ties move the cut to the next distinct value: never more than the group of equal values away.
      expect(Math.abs(kept - Math.round(keep * values.length)), `keep ${keep}`).toBeLessThanOrEqual(4);
    }
    // Sorted: 0 1 2 2 2 2 3 4 5 6. Keeping 5 would cut between two 2s: the cut moves up to 2.5.
    expect(thresholdKeeping(values, 0.5)).toBe(2.5);
    expect(thresholdKeeping(values, 0.3)).toBe(3.5);
    expect(thresholdKeeping(values, 1)).toBe(-1);
    expect(thresholdKeeping(Float64Array.from([2, 2, 2]), 0.5)).toBe(1);
  });
});

describe('modc calibrate on a decoder fed inputs_embeds (fixtures/forms-embeds-tiny)', () => {
  const dir = tempDir('modc-calibrate-embeds');
  const data = join(dir, 'calib.jsonl');
  const embeds = join(ROOT, 'fixtures', 'forms-embeds-tiny', 'model.onnx');
  // The same weights with the token table inside, fed input_ids.
  const same = join(ROOT, 'fixtures', 'forms-unsorted-tiny', 'unsorted.onnx');
  const opts = { targetCompute: 0.85, granularity: 'auto' as const, capacities: [0.75, 0.5], sensitivityTokens: 512, seed: 5 };

  it('calibrates through the embedding model genai_config.json names: the routers of the same model fed input_ids', async () => {
    writeData(data, 24, 32, 13, 256);
    const rows = readDataset(data, { vocabSize: null });
    const [a, b] = [await calibrate(embeds, rows, opts), await calibrate(same, rows, opts)];
    expect(a.routers.length).toBeGreaterThan(0);
    expect(a.routers.map((r) => [describeLayerPart(r), r.capacity])).toEqual(b.routers.map((r) => [describeLayerPart(r), r.capacity]));
    a.routers.forEach((r, i) => {
      const w = b.routers[i]!.weight;
      const scale = Math.max(...Array.from(w, Math.abs));
      expect(Math.max(...Array.from(r.weight, (v, j) => Math.abs(v - w[j]!)))).toBeLessThan(1e-3 * scale);
      expect(r.bias).toBeCloseTo(b.routers[i]!.bias, 3);
    });
    expect(a.report.computeFraction).toBeCloseTo(b.report.computeFraction, 6);
  });

  it('refuses, in one line, a decoder fed inputs_embeds with no embedding model beside it', async () => {
    const lone = join(dir, 'lone', 'model.onnx');
    mkdirSync(join(dir, 'lone'));
    copyFileSync(embeds, lone);
    writeData(data, 4, 16, 13, 256);
    const res = await runCli('calibrate', lone, '--data', data, '--target-compute', '0.9', '-o', join(dir, 'lone', 'r.safetensors'));
    expectOneLineError(res, 1, /takes inputs_embeds: calibrate needs the embedding model that genai_config\.json beside it names/);
  });
});

describe('modc calibrate CLI errors', () => {
  const dir = tempDir('modc-calibrate-cli');
  const data = join(dir, 'calib.jsonl');
  beforeAll(() => writeData(data, 4, 16, 1));

  it('refuses a target compute outside (0, 1]', async () => {
    for (const f of ['0', '1.5', '-0.2'])
      expectOneLineError(
        await runCli('calibrate', MODEL, '--data', data, '-o', join(dir, 'r.safetensors'), `--target-compute=${f}`),
        2,
        /--target-compute must be in \(0, 1\]/,
      );
  });

  it('refuses missing flags and unknown granularities', async () => {
    expectOneLineError(await runCli('calibrate', MODEL, '-o', join(dir, 'r.safetensors'), '--target-compute', '0.8'), 2, /missing --data/);
    expectOneLineError(await runCli('calibrate', MODEL, '--data', data, '--target-compute', '0.8'), 2, /missing -o/);
    expectOneLineError(
      await runCli('calibrate', MODEL, '--data', data, '-o', join(dir, 'r.safetensors'), '--target-compute', '0.8', '--granularity', 'head'),
      2,
      /--granularity must be one of/,
    );
  });

  it('refuses an output it cannot write, before any work', async () => {
    writeFileSync(join(dir, 'afile'), 'x');
    expectOneLineError(
      await runCli('calibrate', MODEL, '--data', data, '-o', join(dir, 'afile', 'r.safetensors'), '--target-compute', '0.8'),
      1,
      /afile' is a file, not a folder/,
    );
    expectOneLineError(await runCli('calibrate', MODEL, '--data', data, '-o', dir, '--target-compute', '0.8'), 1, /is a directory/);
    expectOneLineError(await runCli('calibrate', MODEL, '--data', data, '-o', MODEL, '--target-compute', '0.8'), 1, /refusing to overwrite the input/);
    expectOneLineError(
      await runCli('calibrate', MODEL, '--data', data, '-o', data, '--target-compute', '0.8'),
      1,
      /refusing to overwrite the calibration data/,
    );
  });

  it('refuses data that does not fit the model', async () => {
    const bad = join(dir, 'bad.jsonl');
    writeFileSync(bad, JSON.stringify({ ids: [1, 2, 3, VOCAB] }) + '\n');
    expectOneLineError(
      await runCli('calibrate', MODEL, '--data', bad, '-o', join(dir, 'r.safetensors'), '--target-compute', '0.8'),
      1,
      /line 1: token id 512 is outside the model.s vocabulary \(0-511\)/,
    );
    const long = join(dir, 'long.jsonl');
    writeFileSync(long, JSON.stringify({ ids: Array.from({ length: 300 }, (_, i) => i % VOCAB) }) + '\n');
    expectOneLineError(
      await runCli(
        'calibrate',
        join(ROOT, 'fixtures', 'gpt2-tiny', 'model.onnx'),
        '--data',
        long,
        '--max-length',
        '300',
        '-o',
        join(dir, 'r.safetensors'),
        '--target-compute',
        '0.8',
      ),
      2,
      /--max-length 300 is longer than the model's context of 256 positions/,
    );
    await expect(
      calibrate(join(ROOT, 'fixtures', 'gpt2-tiny', 'model.onnx'), [Array.from({ length: 300 }, (_, i) => i % VOCAB)], { targetCompute: 0.8 }),
    ).rejects.toThrow(/300 tokens, more than the model's 256 positions/);
    const empty = join(dir, 'empty.jsonl');
    writeFileSync(empty, '\n');
    expectOneLineError(await runCli('calibrate', MODEL, '--data', empty, '-o', join(dir, 'r.safetensors'), '--target-compute', '0.8'), 1, /is empty/);
  });
});
