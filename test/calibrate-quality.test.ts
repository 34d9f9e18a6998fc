/**
 * Calibration is worth something on a trained model: on fixtures/quality-lm (a byte-level Llama
 * trained on real text), routers from `calibrate` (its calib.jsonl, 2048 tokens, sensitivity at
 * capacity 0.5, target compute 0.85) compiled with `modc compile --routers` and scored by
 * `modc eval` on the held-out eval.jsonl (64 x 256 bytes):
 * - meet the compute target by eval's count of what ran (computeFraction: MACs of the tokens each
 *   routed part really selected / dense MACs), not by calibrate's own report;
 * - beat seeded random routers (w ~ U(-1, 1)/sqrt(H), the product's `--router-init random`) on the
 *   same parts, top-k at the capacities the calibrated routers selected on the same data (so the
 *   compute is the same), by at least MARGIN nats per byte of held-out NLL, for each of three
 *   random seeds.
 *
 * MARGIN, from measurements (this recipe, 2026-12-06, 20 random seeds 1-20): the calibrated
 * routers reach NLL 1.7122 (dense 1.6452) at compute 0.826; random routers on the same parts at
 * compute 0.826 reach 1.840-2.069, a gap of 0.128 to 0.357 nats (median 0.244; seeds 1, 2, 3
 * used here: 0.249, 0.244, 0.128). MARGIN = 0.05 is under half the smallest gap seen. Routers
 * pointing the wrong way (the fitted weights negated, thresholds kept at the same capacities)
 * reach 2.251, worse than every random draw; negated weights with the calibrated biases select
 * other fractions and run at compute 0.972, over the target. The per-seed measurements are in
 * bench/README.md ("The margin of the calibration quality test"), the test in docs/testing.md.
 *
 * Also: eval's selected fraction of each routed part equals the MoD reference executor's
 * selections counted on the same data (sequences of mixed lengths, left padding), exactly.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { calibrate } from '../compiler/apps/calibration/calibrate.js';
import { routerFileMetadata, writeCalibratedRouters } from '../compiler/apps/calibration/router-file.js';
import { readDataset } from '../compiler/apps/data/index.js';
import { ModReference } from '../compiler/apps/reference/mod-reference.js';
import { routingPlanOf } from '../compiler/apps/verify/verify.js';
import { loadModel } from '../compiler/core/io/load.js';
import { describeLayerPart, type RoutedPart } from '../compiler/routing/routing-plan.js';
import { randomRouters, writeRouterFile } from '../compiler/routing/router-weights.js';
import { ROOT, runCli, tempDir } from './helpers.js';

const DIR = join(ROOT, 'fixtures', 'quality-lm');
const MODEL = join(DIR, 'model.onnx');
const EVAL = join(DIR, 'eval.jsonl');
const HIDDEN = 160;
const TARGET = 0.85;
/** Held-out NLL (nats per byte) by which the calibrated routers must beat each random draw; see above. */
const MARGIN = 0.05;
const RANDOM_SEEDS = [1, 2, 3];

interface EvalJson {
  nll: number;
  computeFraction: number;
  inputTokens: number;
  layers: { layer: number; part: RoutedPart; routed: boolean; selectedFraction: number }[];
}

const tmp = tempDir('modc-calibrate-quality');
let counter = 0;

async function compileEval(flags: string[], data = EVAL, evalFlags: string[] = []): Promise<{ path: string; result: EvalJson }> {
  const path = join(tmp, `m${counter++}`, 'model.onnx');
  const compiled = await runCli('compile', MODEL, '-o', path, '-q', ...flags);
  expect(compiled.code, compiled.stderr).toBe(0);
  const ev = await runCli('eval', path, '--data', data, '--json', '-q', ...evalFlags);
  expect(ev.code, ev.stderr).toBe(0);
  return { path, result: JSON.parse(ev.stdout) as EvalJson };
}

describe('calibrated routers on fixtures/quality-lm, held-out data', () => {
  let calibrated: { path: string; result: EvalJson };
  let routed: EvalJson['layers'];

  beforeAll(async () => {
    const calib = join(DIR, 'calib.jsonl');
    const result = await calibrate(MODEL, readDataset(calib, { vocabSize: null }), {
      targetCompute: TARGET,
      granularity: 'auto',
      capacities: [0.5],
      maxTokens: 2048,
      seed: 0,
      // Routers alone (no MLP surrogates): the random routers compared here have none.
      surrogate: 'none',
    });
    const file = join(tmp, 'calibrated.safetensors');
    writeCalibratedRouters(file, result, routerFileMetadata(result, { path: calib, tokens: result.report.tokens, sequences: result.report.sequences }));
    calibrated = await compileEval(['--routers', file]);
    routed = calibrated.result.layers.filter((l) => l.routed);
  }, 300_000);

  it("meet the compute target by modc eval's count of what ran", () => {
    expect(routed.length).toBeGreaterThan(0);
    expect(calibrated.result.computeFraction).toBeLessThanOrEqual(TARGET);
    // Not far below it either: without surrogates calibrate aims 0.02 under the target on its own data.
    expect(calibrated.result.computeFraction).toBeGreaterThan(TARGET - 0.06);
  });

  it.each(RANDOM_SEEDS)(`beat random routers on the same parts and capacities by ${MARGIN} nats (random seed %i)`, async (seed) => {
    const file = join(tmp, `random-${seed}.safetensors`);
    const routers = randomRouters(
      routed.map((l) => l.layer),
      HIDDEN,
      seed,
    ).map((r, i) => ({ ...r, part: routed[i]!.part }));
    // Top-k at the fractions the calibrated routers selected on this data: the same compute.
    writeRouterFile(file, routers, { mode: 'topk', gated: false, layers: routed.map((l) => ({ layer: l.layer, part: l.part, capacity: l.selectedFraction })) });
    const random = (await compileEval(['--routers', file])).result;
    expect(random.layers.filter((l) => l.routed).map((l) => `${l.layer}/${l.part}`)).toEqual(routed.map((l) => `${l.layer}/${l.part}`));
    expect(Math.abs(random.computeFraction - calibrated.result.computeFraction)).toBeLessThan(0.005);
    expect(random.nll - calibrated.result.nll, `random NLL ${random.nll}, calibrated ${calibrated.result.nll}`).toBeGreaterThanOrEqual(MARGIN);
  });

  it("eval's selected fractions are the reference executor's selections on the same data, exactly", async () => {
    // Sequences of mixed lengths, so batches carry padding (left here).
    const rows = readDataset(EVAL, { vocabSize: null })
      .slice(0, 12)
      .map((r, i) => r.slice(0, 256 - 19 * i));
    const data = join(tmp, 'mixed.jsonl');
    writeFileSync(data, rows.map((ids) => JSON.stringify({ ids })).join('\n') + '\n');
    const ev = await runCli('eval', calibrated.path, '--data', data, '--json', '-q', '--pad', 'left', '--batch', '4');
    expect(ev.code, ev.stderr).toBe(0);
    const result = JSON.parse(ev.stdout) as EvalJson;
    const tokens = rows.reduce((a, r) => a + r.length, 0);
    expect(result.inputTokens).toBe(tokens);

    const plan = routingPlanOf(loadModel(calibrated.path));
    expect(plan.mode).toBe('threshold');
    const ref = await ModReference.create(MODEL, plan, join(tmp, 'ref'));
    const counts = new Map<string, number>();
    let closest = Infinity;
    try {
      for (let i = 0; i < rows.length; i += 4) {
        await ref.forward(rows.slice(i, i + 4), { pad: 'left' });
        for (const [part, picks] of ref.selections.at(-1)!) counts.set(part, (counts.get(part) ?? 0) + picks.reduce((a, p) => a + p.length, 0));
        // Calibrated thresholds are baked into the biases (p = 0.5): the boundary is score 0.
        for (const scores of ref.scores.at(-1)!.values()) for (const s of scores.flat()) closest = Math.min(closest, Math.abs(s));
      }
    } finally {
      await ref.release();
    }
    // No decision within float rounding of its boundary, so the two must agree token for token:
    // the compiled graph's scores and the reference's differ by at most 4.5e-6 on this data
    // (measured), and the closest score is 8.1e-5 from it (a byte layer 0's attention router scores so).
    expect(closest).toBeGreaterThan(2e-5);
    const fromEval = result.layers.filter((l) => l.routed);
    expect(fromEval.length).toBe(plan.layers.length);
    for (const l of fromEval) {
      const key = describeLayerPart({ layer: l.layer, part: l.part });
      expect(counts.has(key), key).toBe(true);
      expect(l.selectedFraction, `${key}: eval's selected fraction vs the reference's ${counts.get(key)} of ${tokens} tokens`).toBe(counts.get(key)! / tokens);
    }
  });
});
