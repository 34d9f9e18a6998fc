/**
 * Quality vs memory: on the trained fixtures (fixtures/quality-lm, fixtures/quality-lm-deep), the
 * held-out NLL and the KV fraction `modc eval` measures, at target KV fractions F, of
 *   - key/value routing calibrated for F (`modc calibrate --target-kv F`);
 *   - key/value routing with random router directions, thresholds placed the same way (the same F);
 *   - attention routing and block routing calibrated for compute (`--granularity attention|block
 *     --target-compute C`), with C the largest compute target whose routers hold at most F of the
 *     KV cache on the calibration data (bisection), so the three methods meet at the same memory.
 * Every model is compiled by the MoD pipeline and measured by `modc eval`'s evaluate().
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { modelCosts } from '../compiler/analysis/cost.js';
import { Calibrator, type CalibrationResult } from '../compiler/apps/calibration/calibrate.js';
import { calibrateKv, kvRouterFileMetadata, type KvCalibrationResult } from '../compiler/apps/calibration/kv-calibrate.js';
import { routerFileMetadata, writeCalibratedRouters } from '../compiler/apps/calibration/router-file.js';
import { readDataset } from '../compiler/apps/data/index.js';
import { evaluate } from '../compiler/apps/eval/index.js';
import { UsageError } from '../compiler/core/errors.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { mulberry32 } from '../compiler/core/random.js';
import { compile } from '../compiler/passes/compile.js';
import { planRouting } from '../compiler/routing/routing-plan.js';
import { flagHelp, log, parseFlags, table } from './common.js';

const FLAGS = {
  fixtures: {
    kind: 'string',
    default: 'fixtures/quality-lm,fixtures/quality-lm-deep',
    help: 'fixture folders (model.onnx, calib.jsonl, eval.jsonl), comma-separated',
  },
  kv: { kind: 'string', default: '0.9,0.75,0.6,0.5', help: 'target KV fractions, comma-separated' },
  seed: { kind: 'int', default: 0, help: 'seed for calibration and the random directions' },
  'max-tokens': { kind: 'int', default: 0, help: "calibration tokens (0: modc calibrate's default, all of calib.jsonl here)" },
  compute: { kind: 'bool', default: true, help: 'also calibrate attention and block routing (--no-compute: key/value routing only)' },
  json: { kind: 'bool', default: false, help: 'print the rows as JSON instead of a table' },
  quick: { kind: 'bool', default: false, help: 'fixtures/quality-lm at KV 0.6 on 2048 calibration tokens: a smoke run' },
  'from-json': { kind: 'string', default: '', help: 'print the table of an earlier --json output instead of measuring' },
} as const;

export const KV_FRONTIER_USAGE = `usage: node dist/bench/run.js kv-frontier [flags]

KV fraction vs held-out NLL: key/value routing (calibrated and random) against attention and block routing, at the same KV targets (bench/README.md, "Quality vs memory").

${flagHelp(FLAGS)}`;

export interface KvFrontierRow {
  fixture: string;
  target: number;
  method: string;
  /** The compute target attention / block routing was calibrated for. */
  computeTarget?: number;
  kvFraction: number;
  computeFraction: number;
  nll: number;
  deltaNll: number;
  seconds: number;
}

export interface KvFrontierReport {
  fixtures: { fixture: string; denseNll: number; calibTokens: number; predictedTokens: number }[];
  seed: number;
  seconds: number;
  rows: KvFrontierRow[];
}

export async function kvFrontierBench(argv: readonly string[]): Promise<void> {
  const f = parseFlags(argv, FLAGS);
  if (f['from-json']) {
    printTable(JSON.parse(readFileSync(f['from-json'], 'utf8')) as KvFrontierReport);
    return;
  }
  const fixtures = (f.quick ? 'fixtures/quality-lm' : f.fixtures).split(',').filter(Boolean);
  const targets = (f.quick ? '0.6' : f.kv).split(',').map(Number);
  if (targets.some((t) => !(t > 0 && t <= 1))) throw new UsageError(`--kv: every target must be in (0, 1], got ${f.kv}`);
  const maxTokens = f.quick ? 2048 : f['max-tokens'] || undefined;
  const dir = mkdtempSync(join(tmpdir(), 'modc-bench-kv-'));
  const t0 = performance.now();
  const report: KvFrontierReport = { fixtures: [], seed: f.seed, seconds: 0, rows: [] };
  try {
    for (const fixture of fixtures) {
      const model = join(fixture, 'model.onnx');
      const calibPath = join(fixture, 'calib.jsonl');
      const calibSeqs = readDataset(calibPath, { model });
      const evalSeqs = readDataset(join(fixture, 'eval.jsonl'), { model });
      const structure = analyzeDecoder(loadModel(model));
      const numLayers = structure.layers.length;
      const hiddenSize = structure.hiddenSize;
      const kvPerToken = modelCosts(structure).layers.map((l) => l.kvPerToken);
      log(`${fixture}: dense eval`);
      const dense = await evaluate(model, evalSeqs);
      report.fixtures.push({ fixture, denseNll: dense.nll, calibTokens: 0, predictedTokens: dense.tokens });
      let n = 0;
      const compileEval = async (file: string) => {
        const m = loadModel(model);
        compile(m, { plan: planRouting({ numLayers, hiddenSize, routers: { kind: 'file', path: file } }), verify: false });
        const out = join(dir, `m${n++}.onnx`);
        saveModel(m, out);
        const r = await evaluate(out, evalSeqs);
        rmSync(out, { force: true });
        return r;
      };
      const add = (
        target: number,
        method: string,
        r: { kvFraction: number; computeFraction: number; nll: number },
        started: number,
        computeTarget?: number,
      ) => {
        const row: KvFrontierRow = {
          fixture,
          target,
          method,
          ...(computeTarget !== undefined ? { computeTarget } : {}),
          kvFraction: r.kvFraction,
          computeFraction: r.computeFraction,
          nll: r.nll,
          deltaNll: r.nll - dense.nll,
          seconds: (performance.now() - started) / 1000,
        };
        report.rows.push(row);
        log(
          `  ${fixture} KV ${target} ${method}: KV ${r.kvFraction.toFixed(3)}, compute ${r.computeFraction.toFixed(3)}, NLL ${r.nll.toFixed(4)} (${row.deltaNll >= 0 ? '+' : ''}${row.deltaNll.toFixed(4)})`,
        );
      };

      const kvRun = async (target: number, method: string, directions?: Map<number, Float32Array>) => {
        const started = performance.now();
        const kv: KvCalibrationResult = await calibrateKv(model, calibSeqs, { targetKv: target, seed: f.seed, maxTokens, directions, workDir: dir });
        report.fixtures.at(-1)!.calibTokens = kv.report.tokens;
        const file = join(dir, `kv-${n}.safetensors`);
        writeCalibratedRouters(file, { routers: kv.routers } as CalibrationResult, kvRouterFileMetadata(kv, null, { path: calibPath }));
        add(target, method, await compileEval(file), started);
      };
      for (const target of targets) {
        await kvRun(target, 'kv, calibrated');
        const next = mulberry32(f.seed + 1);
        const random = new Map(Array.from({ length: numLayers }, (_, l) => [l, Float32Array.from({ length: hiddenSize }, () => next() * 2 - 1)]));
        await kvRun(target, 'kv, random directions', random);
      }

      if (!f.compute) continue;
      for (const granularity of ['attention', 'block'] as const) {
        log(`${fixture}: preparing ${granularity} calibration`);
        const calib = await Calibrator.prepare(model, calibSeqs, { targetCompute: 1, granularity, seed: f.seed, maxTokens, workDir: join(dir, 'work') });
        try {
          for (const target of targets) {
            const t1 = performance.now();
            // KV held on the calibration data: a routed layer holds its selected tokens.
            const kvOf = (r: CalibrationResult) =>
              kvPerToken.reduce((a, w, l) => a + w * (r.report.parts.find((p) => p.layer === l)?.selectedFraction ?? 1), 0) /
              kvPerToken.reduce((a, w) => a + w, 0);
            const at = async (c: number) => {
              try {
                const r = await calib.finish({ targetCompute: c, granularity });
                return { r, kv: kvOf(r) };
              } catch {
                return null;
              }
            };
            // The largest compute target (the least routing) whose KV on the calibration data is at most the target.
            let lo = 0.3;
            let hi = 1;
            let best: { c: number; r: CalibrationResult } | null = null;
            for (let i = 0; i < 7; i++) {
              const mid = (lo + hi) / 2;
              const m = await at(mid);
              if (m && m.kv <= target) {
                best = { c: mid, r: m.r };
                lo = mid;
              } else hi = mid;
            }
            if (!best) {
              log(`  ${fixture} KV ${target} ${granularity}: no compute target in [0.3, 1) reaches it`);
              continue;
            }
            const file = join(dir, `c-${n}.safetensors`);
            const r = best.r.report;
            writeCalibratedRouters(file, best.r, routerFileMetadata(best.r, { path: calibPath, tokens: r.tokens, sequences: r.sequences }));
            add(target, `${granularity} routing`, await compileEval(file), t1, Number(best.c.toFixed(4)));
          }
        } finally {
          calib.release();
        }
      }
    }
    report.seconds = (performance.now() - t0) / 1000;
    if (f.json) console.log(JSON.stringify(report, null, 2));
    else printTable(report);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

function printTable(r: KvFrontierReport): void {
  for (const fx of r.fixtures) {
    console.log(
      `${fx.fixture}: dense NLL ${fx.denseNll.toFixed(4)} on eval.jsonl (${fx.predictedTokens} predicted tokens), calibration on ${fx.calibTokens} tokens of calib.jsonl, seed ${r.seed}`,
    );
    const rows = r.rows.filter((x) => x.fixture === fx.fixture);
    console.log(
      table(
        ['target KV', 'method', 'KV (eval)', 'compute (eval)', 'NLL', 'NLL increase', 'compute target'],
        rows.map((x) => [
          x.target.toFixed(2),
          x.method,
          x.kvFraction.toFixed(3),
          x.computeFraction.toFixed(3),
          x.nll.toFixed(4),
          `${x.deltaNll >= 0 ? '+' : ''}${x.deltaNll.toFixed(4)}`,
          x.computeTarget !== undefined ? x.computeTarget.toFixed(3) : '-',
        ]),
      ),
    );
    console.log('');
  }
  console.log(`(${r.seconds.toFixed(0)} s)`);
}
