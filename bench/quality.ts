/**
 * Quality vs compute on the trained fixtures. By default, `modc calibrate`'s recipe (MLP
 * surrogates, granularity auto) at target compute 0.95, 0.85, 0.80 and 0.75 on fixtures/quality-lm
 * and fixtures/quality-lm-deep: each router file compiled, then its held-out NLL, compute fraction
 * (modc eval's count) and greedy top-1 agreement with the dense model (modc eval --generate).
 *
 * With --compare, on one model (fixtures/quality-lm), the NLL on held-out data and the
 * measured compute fraction of
 *   - the dense model (reference);
 *   - calibrated routers (`modc calibrate`), threshold-p, at each granularity and `auto`, and the
 *     same `auto` routers in top-k form and gated;
 *   - random routers: on the parts and capacities `auto` chose (top-k, so the capacities are
 *     exact), and uniformly on every layer's block / attention / MLP at the capacity that
 *     reaches the target compute;
 * at several target compute fractions. Every model is compiled by the MoD pipeline and measured
 * by `modc eval`'s evaluate() (SPEC.md's compute fraction: MACs that ran over dense MACs).
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { modelCosts } from '../compiler/analysis/cost.js';
import { Calibrator } from '../compiler/apps/calibration/calibrate.js';
import { denseMacs, savedMacs } from '../compiler/apps/calibration/compute.js';
import type { Granularity, RoutedPart } from '../compiler/apps/calibration/parts.js';
import { routerFileMetadata, writeCalibratedRouters } from '../compiler/apps/calibration/router-file.js';
import { TARGET_KINDS, type TargetKind } from '../compiler/apps/calibration/targets.js';
import { readDataset } from '../compiler/apps/data/index.js';
import { evaluate } from '../compiler/apps/eval/index.js';
import { greedyAgreement } from '../compiler/apps/eval/agreement.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { mulberry32 } from '../compiler/core/random.js';
import { planRouting, type RoutingPlan } from '../compiler/routing/routing-plan.js';
import { UsageError } from '../compiler/core/errors.js';
import { flagHelp, log, parseFlags, table } from './common.js';
import { compile } from '../compiler/passes/compile.js';

const FLAGS = {
  model: { kind: 'string', default: 'fixtures/quality-lm/model.onnx', help: 'the trained model' },
  calib: { kind: 'string', default: 'fixtures/quality-lm/calib.jsonl', help: 'calibration data (JSON lines of ids)' },
  eval: { kind: 'string', default: 'fixtures/quality-lm/eval.jsonl', help: 'held-out data the NLL is measured on' },
  targets: { kind: 'string', default: '', help: 'target compute fractions, comma-separated (default 0.95,0.85,0.80,0.75; 0.95,0.85,0.75 with --compare)' },
  seed: { kind: 'int', default: 0, help: 'seed for calibration and random routers' },
  target: { kind: 'string', default: 'relative', help: 'importance target the routers are fitted to: norm, relative, log-norm' },
  'sensitivity-tokens': { kind: 'int', default: 0, help: "tokens per sensitivity measurement (0: modc calibrate's default)" },
  json: { kind: 'bool', default: false, help: 'print the rows as JSON instead of a table' },
  quick: { kind: 'bool', default: false, help: 'one target (0.85): a smoke run' },
  compare: {
    kind: 'bool',
    default: false,
    help: 'on --model: every granularity, top-k, gated and random routers, routers only (no surrogates; targets default 0.95,0.85,0.75)',
  },
  models: {
    kind: 'string',
    default: 'fixtures/quality-lm,fixtures/quality-lm-deep',
    help: 'without --compare: fixture folders (model.onnx, calib.jsonl, eval.jsonl), comma-separated',
  },
  generate: { kind: 'int', default: 16, help: 'without --compare: tokens per eval line for the greedy agreement (0: skip)' },
  'from-json': { kind: 'string', default: '', help: 'print the table of an earlier --json output instead of measuring' },
} as const;

export const QUALITY_USAGE = `usage: node dist/bench/run.js quality [flags]

Compute fraction vs held-out NLL of modc calibrate's recipe on the quality fixtures (bench/README.md, "quality"); with
--compare, dense, calibrated and random routers (bench/README.md, "Quality: calibrated vs random routers").

${flagHelp(FLAGS)}`;

export interface QualityRow {
  target: number;
  method: string;
  granularity: Granularity | 'dense';
  routing: 'threshold' | 'topk' | '-';
  gated: boolean;
  parts: string;
  computeFraction: number;
  nll: number;
  deltaNll: number;
}

export async function qualityBench(argv: readonly string[]): Promise<void> {
  const f = parseFlags(argv, FLAGS);
  if (f['from-json']) {
    const r = JSON.parse(readFileSync(f['from-json'], 'utf8')) as QualityReport | RecipeReport;
    if ('fixtures' in r) printRecipe(r);
    else printTable(r);
    return;
  }
  if (!f.compare) return recipeTable(f);
  const targets = (f.quick ? '0.85' : f.targets || '0.95,0.85,0.75').split(',').map(Number);
  if (!TARGET_KINDS.includes(f.target as TargetKind)) throw new UsageError(`--target must be one of ${TARGET_KINDS.join(', ')}`);
  const dir = mkdtempSync(join(tmpdir(), 'modc-bench-quality-'));
  const t0 = performance.now();
  try {
    const calibSeqs = readDataset(f.calib, { model: f.model });
    const evalSeqs = readDataset(f.eval, { model: f.model });
    const evalTokens = evalSeqs.reduce((a, s) => a + s.length, 0);
    const structure = analyzeDecoder(loadModel(f.model));
    const numLayers = structure.layers.length;
    const hiddenSize = structure.hiddenSize;
    const costs = modelCosts(structure);
    const evalLengths = evalSeqs.map((s) => s.length);

    log(`dense eval of ${f.model} on ${f.eval} (${evalSeqs.length} sequences, ${evalTokens} tokens)`);
    const dense = await evaluate(f.model, evalSeqs);
    const rows: QualityRow[] = [];
    const add = (
      target: number,
      method: string,
      granularity: QualityRow['granularity'],
      routing: QualityRow['routing'],
      gated: boolean,
      parts: string,
      r: { computeFraction: number; nll: number },
    ) => {
      rows.push({ target, method, granularity, routing, gated, parts, computeFraction: r.computeFraction, nll: r.nll, deltaNll: r.nll - dense.nll });
      log(`  ${target} ${method} ${granularity} ${routing}${gated ? ' gated' : ''}: compute ${r.computeFraction.toFixed(3)}, NLL ${r.nll.toFixed(4)}`);
    };
    add(1, 'dense', 'dense', '-', false, '-', dense);

    log(`preparing calibration on ${f.calib} (capture, fit, sensitivity of every part)`);
    const calib = await Calibrator.prepare(f.model, calibSeqs, {
      targetCompute: 1,
      granularity: 'auto',
      seed: f.seed,
      target: f.target as TargetKind,
      sensitivityTokens: f['sensitivity-tokens'] || undefined,
      workDir: join(dir, 'work'),
      surrogate: 'none',
    });
    let n = 0;
    const compileEval = async (plan: RoutingPlan) => {
      const model = loadModel(f.model);
      compile(model, { plan, verify: false });
      const out = join(dir, `m${n++}.onnx`);
      saveModel(model, out);
      const r = await evaluate(out, evalSeqs);
      rmSync(out, { force: true });
      return r;
    };
    const fromFile = (file: string, over: { mode?: 'threshold' | 'topk'; gated?: boolean } = {}) =>
      planRouting({ numLayers, hiddenSize, routers: { kind: 'file', path: file }, ...over });

    for (const target of targets) {
      let autoChoice: { layer: number; part: RoutedPart; capacity: number }[] = [];
      for (const granularity of ['auto', 'block', 'attention', 'mlp'] as const) {
        let result;
        try {
          result = await calib.finish({ targetCompute: target, granularity });
        } catch (e) {
          log(`  ${target} calibrated ${granularity}: ${(e as Error).message}`);
          continue;
        }
        const file = join(dir, `r-${target}-${granularity}.safetensors`);
        writeCalibratedRouters(file, result, routerFileMetadata(result, { path: f.calib, tokens: result.report.tokens, sequences: result.report.sequences }));
        const parts = result.routers.map((r) => `${r.layer}${r.part === 'block' ? '' : r.part === 'attention' ? 'a' : 'm'}@${r.capacity.toFixed(2)}`).join(' ');
        add(target, 'calibrated', granularity, 'threshold', false, parts, await compileEval(fromFile(file)));
        if (granularity === 'auto') {
          autoChoice = result.routers.map((r) => ({ layer: r.layer, part: r.part, capacity: r.capacity }));
          add(target, 'calibrated', granularity, 'topk', false, parts, await compileEval(fromFile(file, { mode: 'topk' })));
          add(target, 'calibrated', granularity, 'threshold', true, parts, await compileEval(fromFile(file, { gated: true })));
          add(target, 'random (same parts)', granularity, 'topk', false, parts, await compileEval(randomPlan(autoChoice, hiddenSize, f.seed)));
        }
      }
      for (const part of ['block', 'attention', 'mlp'] as const) {
        const c = uniformCapacity(costs, evalLengths, numLayers, part, target);
        if (c === null) {
          log(`  ${target} random ${part}: the target is out of reach routing every layer's ${part}`);
          continue;
        }
        const plan = randomPlan(
          Array.from({ length: numLayers }, (_, layer) => ({ layer, part, capacity: c })),
          hiddenSize,
          f.seed,
        );
        add(target, 'random (every layer)', part, 'topk', false, `all@${c.toFixed(2)}`, await compileEval(plan));
      }
    }
    calib.release();

    const report: QualityReport = {
      model: f.model,
      calib: f.calib,
      eval: f.eval,
      target: f.target,
      calibSequences: calibSeqs.length,
      evalTokens,
      predictedTokens: dense.tokens,
      denseNll: dense.nll,
      seconds: (performance.now() - t0) / 1000,
      rows,
    };
    if (f.json) console.log(JSON.stringify(report, null, 2));
    else printTable(report);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

export interface QualityReport {
  model: string;
  calib: string;
  eval: string;
  target: string;
  /** Absent in reports written before they were added. */
  calibSequences?: number;
  evalTokens: number;
  predictedTokens?: number;
  denseNll: number;
  seconds: number;
  rows: QualityRow[];
}

function printTable(r: QualityReport): void {
  const calib = r.calibSequences !== undefined ? ` (${r.calibSequences} sequences)` : '';
  const tokens = r.predictedTokens !== undefined ? `${r.predictedTokens} predicted tokens` : `${r.evalTokens} tokens`;
  console.log(`model ${r.model}; calibration ${r.calib}${calib}, importance target ${r.target}; NLL on ${r.eval} (${tokens}), nats/token`);
  console.log(
    `dense NLL ${r.denseNll.toFixed(4)}. compute: measured by modc eval (MACs run / dense MACs). parts: layer (a = attention, m = mlp, none = block) @ capacity`,
  );
  console.log('');
  console.log(
    table(
      ['target', 'method', 'granularity', 'routing', 'compute', 'NLL', 'NLL increase', 'parts'],
      r.rows.map((x) => [
        x.target === 1 ? '-' : x.target.toFixed(2),
        x.method,
        x.granularity,
        `${x.routing}${x.gated ? ', gated' : ''}`,
        x.computeFraction.toFixed(3),
        x.nll.toFixed(4),
        x.deltaNll.toFixed(4),
        x.parts,
      ]),
    ),
  );
  console.log(`\n(${r.seconds.toFixed(0)} s)`);
}

/** Random routers (w ~ U(-1, 1)/sqrt(H)) on the given parts, top-k at the given capacities, ungated. */
function randomPlan(parts: readonly { layer: number; part: RoutedPart; capacity: number }[], hiddenSize: number, seed: number): RoutingPlan {
  const next = mulberry32(seed + 1);
  const scale = 1 / Math.sqrt(hiddenSize);
  return {
    mode: 'topk',
    gated: false,
    layers: parts.map((p) => {
      const weight = Float32Array.from({ length: hiddenSize }, () => (next() * 2 - 1) * scale);
      return { layer: p.layer, part: p.part, router: { layer: p.layer, part: p.part, weight, bias: 0 }, threshold: 0.5, capacity: p.capacity };
    }),
    unconverted: [],
  };
}

/** The capacity at which routing `part` on every layer reaches `target` compute (cost model), or null. */
function uniformCapacity(costs: ReturnType<typeof modelCosts>, lengths: readonly number[], numLayers: number, part: RoutedPart, target: number): number | null {
  const dense = denseMacs(costs, lengths);
  const compute = (c: number) => 1 - Array.from({ length: numLayers }, (_, l) => savedMacs(costs, l, part, c, lengths)).reduce((a, b) => a + b, 0) / dense;
  if (compute(0.02) > target) return null;
  let lo = 0.02;
  let hi = 1;
  for (let i = 0; i < 40; i++) {
    const mid = (lo + hi) / 2;
    if (compute(mid) > target) hi = mid;
    else lo = mid;
  }
  return lo;
}

interface RecipeRow {
  target: number;
  computeFraction: number;
  nll: number;
  deltaNll: number;
  /** Greedy top-1 agreement with the dense model (null when not measured). */
  agreement: number | null;
  parts: string;
}

export interface RecipeReport {
  targets: number[];
  generate: number;
  seconds: number;
  fixtures: { model: string; calib: string; eval: string; predictedTokens: number; denseNll: number; rows: RecipeRow[] }[];
}

/** modc calibrate's default recipe at each target on each fixture: calibrate, compile, eval (and --generate). */
async function recipeTable(f: ReturnType<typeof parseFlags<typeof FLAGS>>): Promise<void> {
  const targets = (f.quick ? '0.85' : f.targets || '0.95,0.85,0.80,0.75').split(',').map(Number);
  const dir = mkdtempSync(join(tmpdir(), 'modc-bench-quality-'));
  const t0 = performance.now();
  const report: RecipeReport = { targets, generate: f.generate, seconds: 0, fixtures: [] };
  try {
    for (const folder of f.models.split(',')) {
      const model = join(folder, 'model.onnx');
      const calibPath = join(folder, 'calib.jsonl');
      const evalPath = join(folder, 'eval.jsonl');
      const calibSeqs = readDataset(calibPath, { model });
      const evalSeqs = readDataset(evalPath, { model });
      const structure = analyzeDecoder(loadModel(model));
      log(`dense eval of ${model} on ${evalPath}`);
      const dense = await evaluate(model, evalSeqs);
      log(`preparing calibration on ${calibPath} (modc calibrate's defaults)`);
      const calib = await Calibrator.prepare(model, calibSeqs, { targetCompute: 1, seed: f.seed, workDir: join(dir, 'work') });
      const rows: RecipeRow[] = [];
      try {
        for (const target of targets) {
          const result = await calib.finish({ targetCompute: target });
          const file = join(dir, `r-${target}.safetensors`);
          writeCalibratedRouters(
            file,
            result,
            routerFileMetadata(result, { path: calibPath, tokens: result.report.tokens, sequences: result.report.sequences }),
          );
          const plan = planRouting({ numLayers: structure.layers.length, hiddenSize: structure.hiddenSize, routers: { kind: 'file', path: file } });
          const m = loadModel(model);
          compile(m, { plan, verify: false });
          const out = join(dir, `m-${target}.onnx`);
          saveModel(m, out);
          const r = await evaluate(out, evalSeqs);
          const agreement = f.generate > 0 ? (await greedyAgreement(out, model, evalSeqs, { tokens: f.generate })).agreement : null;
          rmSync(out, { force: true });
          const tag = (p: RoutedPart) => (p === 'block' ? '' : p === 'attention' ? 'a' : 'm');
          const parts = [
            ...result.report.parts.map((p) => `${p.layer}${tag(p.part)}${p.surrogate ? `/r${p.surrogate.rank}` : ''}@${p.capacity.toFixed(2)}`),
          ].join(' ');
          rows.push({ target, computeFraction: r.computeFraction, nll: r.nll, deltaNll: r.nll - dense.nll, agreement, parts });
          log(
            `  ${model} ${target}: compute ${r.computeFraction.toFixed(4)}, NLL ${r.nll.toFixed(4)} (${(r.nll - dense.nll >= 0 ? '+' : '') + (r.nll - dense.nll).toFixed(4)})${agreement !== null ? `, agreement ${agreement.toFixed(4)}` : ''}`,
          );
        }
      } finally {
        calib.release();
      }
      report.fixtures.push({ model, calib: calibPath, eval: evalPath, predictedTokens: dense.tokens, denseNll: dense.nll, rows });
    }
    report.seconds = (performance.now() - t0) / 1000;
    if (f.json) console.log(JSON.stringify(report, null, 2));
    else printRecipe(report);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

function printRecipe(r: RecipeReport): void {
  console.log(
    `modc calibrate's default recipe (MLP surrogates, granularity auto), compiled; NLL on each fixture's eval.jsonl in nats/token; compute by modc eval (MACs run / dense MACs)`,
  );
  console.log(
    `agreement: greedy top-1 agreement with the dense model over ${r.generate} tokens after each eval line's prefix (modc eval --generate). parts: layer (a = attention, m = mlp, /rR = surrogate rank) @ capacity`,
  );
  console.log('');
  console.log(
    table(
      ['model', 'dense NLL', 'target', 'compute', 'NLL', 'NLL increase', 'agreement', 'parts'],
      r.fixtures.flatMap((x) =>
        x.rows.map((row) => [
          x.model,
          x.denseNll.toFixed(4),
          row.target.toFixed(2),
          row.computeFraction.toFixed(4),
          row.nll.toFixed(4),
          (row.deltaNll >= 0 ? '+' : '') + row.deltaNll.toFixed(4),
          row.agreement === null ? '-' : row.agreement.toFixed(4),
          row.parts,
        ]),
      ),
    ),
  );
  console.log(`\n(${r.seconds.toFixed(0)} s)`);
}
