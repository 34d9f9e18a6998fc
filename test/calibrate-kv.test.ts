/**
 * modc calibrate --target-kv F: key/value routers for a KV fraction, on fixtures/quality-lm (a
 * byte-level Llama trained on real text; calib.jsonl, 2048 tokens), compiled with
 * `modc compile --routers` and no other flag, scored by `modc eval` on the held-out eval.jsonl
 * (64 x 256 bytes):
 * - eval's KV fraction is at most F + KV_SLACK. Calibrate holds each layer's KV fraction at its
 *   share of F on its own data; held-out text keeps a different number of tokens above the same
 *   thresholds. Measured with this recipe (2048 tokens, seed 0): eval KV 0.579 at F = 0.6 (0.021
 *   below); in every run measured (2048 tokens to the whole calib.jsonl, F 0.5 to 0.9, both
 *   fixtures: bench/README.md, "Quality vs memory") eval KV landed 0.004 to 0.023 below F, never
 *   above. KV_SLACK = 0.015 allows for a 2048-token sample landing above by as much as those
 *   landed below; the test also requires it within 0.05 below F (not far below either);
 * - it beats key/value routers with random directions whose thresholds are placed the same way
 *   (the same F; at least as much KV on eval): each draw of seeds 1-4, and their mean by
 *   MEAN_MARGIN nats per byte. Measured 2026-12-06 with this recipe: calibrated NLL 1.6464 (dense
 *   1.6452) at KV 0.579; random directions, seeds 1-6: 1.6645, 1.6866, 1.6649, 1.7091, 1.6640,
 *   1.6484 (gaps 0.018, 0.040, 0.019, 0.063, 0.018, 0.002). This fixture is very local (sinks and
 *   window alone cost +0.021), so a lucky random draw comes close (seed 6) and no per-draw margin
 *   is safe; the mean of seeds 1-4 is 0.035 above, MEAN_MARGIN = 0.01 under a third of that;
 * - the threshold rule itself (kvThreshold) on hand-counted rows, and one-line flag errors.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import type { CalibrationResult } from '../compiler/apps/calibration/calibrate.js';
import { calibrateKv, kvRouterFileMetadata, kvThreshold } from '../compiler/apps/calibration/kv-calibrate.js';
import { writeCalibratedRouters } from '../compiler/apps/calibration/router-file.js';
import { readDataset } from '../compiler/apps/data/index.js';
import { mulberry32 } from '../compiler/core/random.js';
import { loadRouterFile } from '../compiler/routing/router-weights.js';
import { compileAndEval, expectOneLineError, ROOT, runCli, tempDir } from './helpers.js';

const DIR = join(ROOT, 'fixtures', 'quality-lm');
const MODEL = join(DIR, 'model.onnx');
const CALIB = join(DIR, 'calib.jsonl');
const EVAL = join(DIR, 'eval.jsonl');
const HIDDEN = 160;
const LAYERS = 6;
const F = 0.6;
const TOKENS = '2048';
/** How far above F eval's KV fraction on held-out data may land; see above. */
const KV_SLACK = 0.015;
/** Held-out NLL (nats per byte) by which the calibrated routers must beat the random draws' mean; see above. */
const MEAN_MARGIN = 0.01;
const RANDOM_SEEDS = [1, 2, 3, 4];

interface EvalJson {
  nll: number;
  kvFraction: number;
  computeFraction: number;
  layers: { layer: number; part: string; routed: boolean; selectedFraction: number; kvFraction?: number }[];
}

const tmp = tempDir('modc-calibrate-kv');
let counter = 0;

const compileEval = (routers: string) => compileAndEval<EvalJson>(MODEL, routers, join(tmp, `m${counter++}.onnx`), EVAL);

describe('kvThreshold: the most tokens kept with the KV fraction at most F', () => {
  // One row of 30 tokens, sinks 2, window 8: the middle tokens are 2..21 (20 of them), scored 0..19.
  const row = Float32Array.from({ length: 30 }, (_, j) => (j >= 2 && j < 22 ? j - 2 : 100));
  const policy = { sinks: 2, window: 8 };

  it('keeps floor(F * n) - sinks - window middle tokens, the highest scored', () => {
    // F = 0.5: 15 entries, 10 fixed, so 5 kept: scores 15..19; the threshold lies between 14 and 15.
    const t = kvThreshold([row], policy, 0.5)!;
    expect(t.kvFraction).toBe(15 / 30);
    expect(t.threshold).toBeGreaterThan(14);
    expect(t.threshold).toBeLessThanOrEqual(15);
  });

  it('keeps fewer at a tie rather than pass F', () => {
    const tied = row.slice();
    tied[2 + 14] = 15; // two tokens score 15; keeping 5 would need one of them only
    const t = kvThreshold([tied], policy, 0.5)!;
    expect(t.kvFraction).toBe(14 / 30);
    expect(t.threshold).toBeGreaterThan(15);
  });

  it('keeps every token at F = 1, and reports F below sinks + window as unreachable', () => {
    expect(kvThreshold([row], policy, 1)!.kvFraction).toBe(1);
    expect(kvThreshold([row], policy, 1)!.threshold).toBeLessThan(0);
    expect(kvThreshold([row], policy, 9 / 30)).toBeNull();
  });
});

describe('modc calibrate --target-kv on fixtures/quality-lm, held-out data', () => {
  const file = join(tmp, 'kv.safetensors');
  let calibrated: EvalJson;

  beforeAll(async () => {
    const res = await runCli('calibrate', MODEL, '--data', CALIB, '-o', file, '--target-kv', String(F), '--max-tokens', TOKENS, '-q');
    expect(res.code, res.stderr).toBe(0);
    calibrated = await compileEval(file);
  }, 300_000);

  it('writes one kv router per layer with the default sinks and window', () => {
    const routers = loadRouterFile(file, { hiddenSize: HIDDEN, numLayers: LAYERS });
    expect(routers.routers.map((r) => `${r.layer}/${r.part}`)).toEqual(Array.from({ length: LAYERS }, (_, l) => `${l}/kv`));
    expect(routers.metadata?.kv).toEqual({ sinks: 4, window: 16 });
  });

  it(`reaches KV ${F} by modc eval's count on held-out data (within ${KV_SLACK}), and not far below`, () => {
    expect(calibrated.kvFraction).toBeLessThanOrEqual(F + KV_SLACK);
    expect(calibrated.kvFraction).toBeGreaterThan(F - 0.05);
    for (const l of calibrated.layers) expect(l.part).toBe('kv');
    // Every token runs the layer; only (query, key) pairs are saved.
    expect(calibrated.computeFraction).toBeLessThan(1);
    expect(calibrated.computeFraction).toBeGreaterThan(0.85);
  });

  describe('against key/value routers with random directions, thresholds placed the same way', () => {
    const random: EvalJson[] = [];
    beforeAll(async () => {
      const sequences = readDataset(CALIB, { vocabSize: null });
      for (const seed of RANDOM_SEEDS) {
        const next = mulberry32(seed);
        const directions = new Map(Array.from({ length: LAYERS }, (_, l) => [l, Float32Array.from({ length: HIDDEN }, () => next() * 2 - 1)]));
        const kv = await calibrateKv(MODEL, sequences, { targetKv: F, maxTokens: Number(TOKENS), seed: 0, directions });
        const randomFile = join(tmp, `random-${seed}.safetensors`);
        writeCalibratedRouters(randomFile, { routers: kv.routers } as CalibrationResult, kvRouterFileMetadata(kv, null, { path: CALIB }));
        random.push(await compileEval(randomFile));
      }
    }, 300_000);

    it("at the same F: at least the calibrated routers' memory, so the comparison does not favour them", () => {
      for (const r of random) expect(r.kvFraction).toBeGreaterThan(calibrated.kvFraction - 0.01);
    });

    it.each(RANDOM_SEEDS.map((seed, i) => [seed, i]))('beats the draw of seed %i', (_, i) => {
      expect(random[i]!.nll, `random NLL ${random[i]!.nll}, calibrated ${calibrated.nll}`).toBeGreaterThan(calibrated.nll);
    });

    it(`beats their mean by ${MEAN_MARGIN} nats`, () => {
      const mean = random.reduce((a, r) => a + r.nll, 0) / random.length;
      expect(mean - calibrated.nll, `random NLLs ${random.map((r) => r.nll.toFixed(4)).join(', ')}, calibrated ${calibrated.nll}`).toBeGreaterThanOrEqual(
        MEAN_MARGIN,
      );
    });
  });
});

describe('modc calibrate --target-kv with --target-compute on fixtures/quality-lm', () => {
  it('routes MLP parts beside every kv part and meets both targets by modc eval on held-out data', async () => {
    const file = join(tmp, 'both.safetensors');
    const res = await runCli(
      'calibrate',
      MODEL,
      '--data',
      CALIB,
      '-o',
      file,
      '--target-kv',
      String(F),
      '--target-compute',
      '0.85',
      '--max-tokens',
      TOKENS,
      '--json',
      '-q',
    );
    expect(res.code, res.stderr).toBe(0);
    const report = JSON.parse(res.stdout) as { kv: { denseNll: number; nll: number } };
    // The original model's NLL on the same 2048 tokens (what the kv-alone calibration above
    // recorded), not the MLP-routed one: with surrogates the routed NLL may even be below it.
    const alone = loadRouterFile(join(tmp, 'kv.safetensors'), { hiddenSize: HIDDEN, numLayers: LAYERS }).metadata?.calibration as {
      kv: { report: { denseNll: number } };
    };
    expect(report.kv.denseNll).toBeGreaterThan(1.5);
    expect(report.kv.denseNll).toBeCloseTo(alone.kv.report.denseNll, 9);
    expect(Math.abs(report.kv.nll - report.kv.denseNll)).toBeGreaterThan(1e-4);
    const loaded = loadRouterFile(file, { hiddenSize: HIDDEN, numLayers: LAYERS });
    const parts = loaded.routers.map((r) => r.part);
    expect(parts.filter((p) => p === 'kv')).toHaveLength(LAYERS);
    expect(parts.filter((p) => p === 'mlp').length + loaded.replaced.length).toBeGreaterThan(0);
    expect(parts.filter((p) => p !== 'kv' && p !== 'mlp')).toEqual([]);
    // The MLP parts take surrogates here too (the default recipe): at least one routed or replaced MLP has one.
    expect(loaded.routers.some((r) => r.surrogate) || loaded.replaced.length > 0).toBe(true);
    const both = await compileEval(file);
    expect(both.kvFraction).toBeLessThanOrEqual(F + KV_SLACK);
    expect(both.computeFraction).toBeLessThanOrEqual(0.85);
    // The MLP parts make up only what key/value routing does not save: not far below the target.
    expect(both.computeFraction).toBeGreaterThan(0.78);
  }, 300_000);
});

describe('modc calibrate --target-kv: flag errors', () => {
  const out = join(tmp, 'never.safetensors');
  const run = (...flags: string[]) => runCli('calibrate', MODEL, '--data', CALIB, '-o', out, '--max-tokens', '512', ...flags);

  it.each([
    [['--target-kv', '0'], /--target-kv must be in \(0, 1\], got 0/],
    [['--target-kv', '1.5'], /--target-kv must be in \(0, 1\], got 1.5/],
    [['--target-kv', 'half'], /--target-kv/],
    [['--target-kv', '0.6', '--routing', 'topk'], /threshold-only: drop --routing topk/],
    [['--target-kv', '0.6', '--granularity', 'attention'], /--granularity attention with --target-kv/],
    [['--kv-window', '8', '--target-compute', '0.9'], /--kv-sinks and --kv-window go with --target-kv/],
    [['--target-kv', '0.6', '--kv-window', '0'], /--kv-window/],
    [['--target-kv', '0.6', '--surrogate', 'none'], /--surrogate, --surrogate-ranks and --no-refit go with --target-compute/],
    [[], /missing --target-compute F \(or --target-kv F\)/],
  ])('%j is a one-line usage error, no file written', async (flags, pattern) => {
    expectOneLineError(await run(...flags), 2, pattern);
    expect(existsSync(out)).toBe(false);
  });

  it('a model none of whose layers can route its KV cache is a one-line error saying why', async () => {
    const gqa = join(ROOT, 'fixtures', 'forms-gqa-tiny', 'model.onnx');
    const res = await runCli('calibrate', gqa, '--data', CALIB, '-o', out, '--max-tokens', '512', '--target-kv', '0.6');
    expectOneLineError(res, 1, /no layer of .* can route its KV cache for --target-kv \(layer 0: .*GroupQueryAttention/);
    expect(existsSync(out)).toBe(false);
  });

  it('a target below what sinks and window alone hold is a one-line error naming them', async () => {
    // 512 tokens in 2 rows of 256: sinks 4 + window 16 hold 20 / 256 = 0.078 of each row.
    const res = await run('--target-kv', '0.05');
    expect(res.code).not.toBe(0);
    expectOneLineError(res, res.code, /cannot reach KV fraction 0.05: the 4 sinks and the window of 16 alone hold 0.078/);
    expect(existsSync(out)).toBe(false);
  });
});
