/**
 * Recipe benchmark: what `modc calibrate --target-compute F` chooses on the trained quality
 * fixture, and what that choice buys on the bench-size model.
 *
 * 1. Calibrate fixtures/quality-lm (or --model) on its calib.jsonl as `modc calibrate` does
 *    (granularity auto, its defaults, MLP surrogates included), once per target F: the routed
 *    parts, their capacities and surrogate ranks, and the MLPs replaced by their surrogate.
 *    The NLL increase of that allocation is measured by evaluate() on eval.jsonl, the calibrated
 *    routers compiled top-k (the allocation timed below) and threshold (calibrate's own file).
 * 2. Place the same parts and capacities on the bench model (builder --form, random non-zero
 *    weights) by relative depth: quality layer l of L covers bench layers
 *    round(l * L' / L) .. round((l + 1) * L' / L) - 1 of L' (each bench layer gets at most one
 *    source layer; when L' < L some source layers map to no bench layer and are listed). Routers
 *    are random (seeded) in top-k mode at those capacities; each router's bias is set from its
 *    scores on the prompt so that r >= 0.5, the one-token decode rule, selects about the same
 *    fraction of tokens as the capacity (top-k on the prompt does not depend on the bias). A part
 *    with a surrogate gets a random one of the same rank, and a replaced MLP is replaced: what
 *    they cost depends on their shapes only. The ideal charges a skipped token its surrogate.
 * 3. Time prefill and decode of each such model against the original, one pair alive at a time
 *    (as the prefill and decode benchmarks do), and compare with the ideal from the original's
 *    unit times and the selections the model made.
 */
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { type CallTime } from '../compiler/apps/benchmark/benchmark.js';
import { Calibrator, type CalibrationResult } from '../compiler/apps/calibration/calibrate.js';
import { routerFileMetadata, writeCalibratedRouters } from '../compiler/apps/calibration/router-file.js';
import { readDataset } from '../compiler/apps/data/index.js';
import { evaluate } from '../compiler/apps/eval/index.js';
import { UsageError } from '../compiler/core/errors.js';
import { DataType } from '../compiler/core/ir/dtype.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { mulberry32 } from '../compiler/core/random.js';
import { decoderIo } from '../compiler/metadata/decoder-io.js';
import { compile } from '../compiler/passes/compile.js';
import { planRouting, type RoutedPart, type RoutingPlan, type Surrogate } from '../compiler/routing/routing-plan.js';
import { surrogateMacs } from '../compiler/routing/router-weights.js';
import type { ort } from '../compiler/runtime/ort.js';
import { ModSession } from '../compiler/runtime/session.js';
import {
  applyQuick,
  buildModel,
  compileModel,
  environment,
  flagHelp,
  formOf,
  givenFlags,
  log,
  modelFlags,
  modelLine,
  ms,
  originalFeeds,
  parseFlags,
  pct,
  ratio,
  sessionOptions,
  settingsJson,
  table,
  timeUnits,
  tokenIds,
  Workdir,
  type FlagSpecs,
} from './common.js';
import { layerCosts, measureSelections, median, type PairTimes, partShare, ratioSpan, timePair } from './pairs.js';

export const RECIPE_FLAGS = {
  ...modelFlags({ prompt: 1024, runs: 5, warmup: 2 }),
  prompt: { kind: 'int', default: 1024, help: 'prefill prompt tokens', min: 1 },
  runs: { kind: 'int', default: 5, help: 'timed prefill rounds per pair', min: 1 },
  warmup: { kind: 'int', default: 2, help: 'untimed prefill rounds per pair' },
  'decode-prompt': { kind: 'int', default: 2047, help: 'prompt tokens before the decode steps', min: 1 },
  steps: { kind: 'int', default: 32, help: 'timed decode steps per pair', min: 1 },
  'decode-warmup': { kind: 'int', default: 3, help: 'untimed decode steps after the prefill' },
  'unit-runs': { kind: 'int', default: 5, help: 'timed runs of the layer-by-layer units (median per unit)', min: 1 },
  targets: { kind: 'string', default: '0.95,0.85,0.75', help: 'target compute fractions F, comma-separated' },
  model: { kind: 'string', default: 'fixtures/quality-lm/model.onnx', help: 'the trained model calibrated' },
  calib: { kind: 'string', default: 'fixtures/quality-lm/calib.jsonl', help: 'its calibration data' },
  eval: { kind: 'string', default: 'fixtures/quality-lm/eval.jsonl', help: 'its held-out data (NLL)' },
  seed: { kind: 'int', default: 0, help: "calibration seed (modc calibrate's --seed)" },
  surrogate: { kind: 'string', default: 'lowrank', help: "MLP surrogates, as modc calibrate's --surrogate: lowrank (its default) or none (routers only)" },
} satisfies FlagSpecs;

export const RECIPE_USAGE = `node dist/bench/run.js recipe [flags]   (npm run bench -- recipe [flags])

Calibrates --model (fixtures/quality-lm) at each target compute F as modc calibrate does,
measures the NLL increase of that allocation on --eval, places the same parts and capacities on
the bench model by relative depth (quality layer l of L -> bench layers round(l L'/L) ..
round((l+1) L'/L) - 1), compiles it top-k with random routers, and times prefill and decode
against the original (one pair alive at a time): speedups against the original and against the
ideal, next to the NLL increase. Ends with one line per target: "at +X nats: Y x prefill, Z x decode".

${flagHelp(RECIPE_FLAGS)}`;

/** Bench layers a quality layer covers: round(l L'/L) .. round((l+1) L'/L) - 1. */
export function mapLayers(l: number, from: number, to: number): number[] {
  const a = Math.round((l * to) / from);
  const b = Math.round(((l + 1) * to) / from);
  return Array.from({ length: Math.max(0, b - a) }, (_, i) => a + i);
}

interface Placed {
  /** capacity 0: an MLP replaced by its surrogate (no router); rank: the surrogate's, when the part has one. */
  source: { layer: number; part: RoutedPart; capacity: number; rank?: number };
  layers: number[];
}

/** Each calibrated part (and each MLP replaced by its surrogate) on the bench layers its source layer covers. */
function place(result: CalibrationResult, from: number, to: number): Placed[] {
  return [
    ...result.routers.map((r) => ({
      source: { layer: r.layer, part: r.part, capacity: r.capacity, ...(r.surrogate ? { rank: r.surrogate.rank } : {}) },
      layers: mapLayers(r.layer, from, to),
    })),
    ...result.replaced.map((r) => ({ source: { layer: r.layer, part: r.part, capacity: 0, rank: r.surrogate.rank }, layers: mapLayers(r.layer, from, to) })),
  ];
}

/**
 * A random surrogate of the given rank (seeded): its values do not matter for speed, only its
 * shape (A [H, rank], B [rank, H], bias [H]); small, so the residual stream stays in range.
 */
function randomSurrogate(rank: number, hiddenSize: number, seed: number): Surrogate {
  const next = mulberry32(seed);
  const u = (n: number, scale: number) => Float32Array.from({ length: n }, () => (next() * 2 - 1) * scale);
  return { rank, a: u(hiddenSize * rank, 1 / Math.sqrt(hiddenSize)), b: u(rank * hiddenSize, 0.01), bias: u(hiddenSize, 0.01) };
}

/**
 * Random routers (w ~ U(-1, 1)/sqrt(H), seeded per part) on the placed parts, top-k at their
 * capacities, ungated, biases 0 unless given; a part with a surrogate gets a random one of its
 * rank, and an MLP replaced by its surrogate is replaced here too.
 */
function benchPlan(placed: readonly Placed[], hiddenSize: number, seed: number, biases?: Map<string, number>): RoutingPlan {
  const scale = 1 / Math.sqrt(hiddenSize);
  const all = placed
    .flatMap((p) => p.layers.map((layer) => ({ layer, part: p.source.part, capacity: p.source.capacity, rank: p.source.rank })))
    .sort((a, b) => a.layer - b.layer || a.part.localeCompare(b.part));
  const partSeed = (layer: number, part: RoutedPart) => seed * 7919 + layer * 3 + (part === 'block' ? 0 : part === 'attention' ? 1 : 2);
  const surrogateOf = (p: { layer: number; part: RoutedPart; rank?: number }) =>
    p.rank ? { surrogate: randomSurrogate(p.rank, hiddenSize, partSeed(p.layer, p.part) + 1) } : {};
  const layers = all
    .filter((p) => p.capacity > 0)
    .map((p) => {
      const next = mulberry32(partSeed(p.layer, p.part));
      const weight = Float32Array.from({ length: hiddenSize }, () => (next() * 2 - 1) * scale);
      const bias = biases?.get(`${p.layer}/${p.part}`) ?? 0;
      const router = { layer: p.layer, part: p.part, weight, bias, ...surrogateOf(p) };
      return { layer: p.layer, part: p.part, router, threshold: 0.5, capacity: p.capacity };
    });
  const replaced = all.filter((p) => p.capacity === 0).map((p) => ({ layer: p.layer, part: 'mlp' as const, surrogate: surrogateOf(p).surrogate! }));
  return { mode: 'topk', gated: false, layers, unconverted: [], ...(replaced.length ? { replaced } : {}) };
}

/**
 * The bias per routed part that makes r = sigmoid(score) >= 0.5 select about its capacity's
 * fraction of tokens: minus the (1 - c) quantile of its scores on the prompt, read from the
 * compiled model's Router outputs (top-k ranks on the prompt, so the bias does not change them).
 */
async function biasesForCapacity(
  w: Workdir,
  compiled: string,
  plan: RoutingPlan,
  prompt: number[][],
  session: Parameters<typeof ModSession.create>[1],
): Promise<Map<string, number>> {
  const model = loadModel(compiled);
  const g = model.graph;
  const scores = new Map<string, string>();
  for (const n of g.nodes) {
    if (n.domain !== 'modc' || n.opType !== 'Router') continue;
    const m = /^modc\.router\.(\d+)(?:\.(attn|mlp))?\.weight$/.exec(n.input(1)?.name ?? '');
    if (!m) continue;
    const out = n.output(0);
    out.type ??= { tensor_type: { elem_type: DataType.FLOAT } };
    if (!g.outputs.includes(out)) g.outputs.push(out);
    scores.set(`${m[1]}/${m[2] === 'attn' ? 'attention' : (m[2] ?? 'block')}`, out.name);
  }
  const probe = w.path(
    `${compiled
      .split('/')
      .at(-1)!
      .replace(/\.onnx$/, '')}.scores.onnx`,
  );
  saveModel(model, probe);
  const s = await ModSession.create(probe, session);
  try {
    await s.forward(prompt);
    const biases = new Map<string, number>();
    for (const lp of plan.layers) {
      const key = `${lp.layer}/${lp.part}`;
      const name = scores.get(key);
      if (!name) continue;
      const values = Float32Array.from((s.lastOutputs[name] as ort.Tensor).data as Float32Array).sort();
      const q = values[Math.min(values.length - 1, Math.max(0, Math.floor((1 - lp.capacity) * values.length)))]!;
      biases.set(key, -q);
    }
    return biases;
  } finally {
    await s.session.release();
  }
}

interface TargetResult {
  target: number;
  parts: string;
  placed: Placed[];
  quality: { topk: { deltaNll: number; computeFraction: number }; threshold: { deltaNll: number; computeFraction: number } };
  prefill: { t: PairTimes; idealSpeedup: number; achievedSpeedup: number; achievedOverIdeal: number };
  decode: { t: PairTimes; idealSpeedup: number; achievedSpeedup: number; achievedOverIdeal: number; meanSkip: number };
  headline: string;
}

export async function recipeBench(argv: readonly string[]): Promise<void> {
  const given = givenFlags(argv);
  const f0 = applyQuick(parseFlags(argv, RECIPE_FLAGS), argv, { 'unit-runs': 2 });
  const f = f0.quick
    ? {
        ...f0,
        targets: given.has('targets') ? f0.targets : '0.85',
        'decode-prompt': given.has('decode-prompt') ? f0['decode-prompt'] : 128,
        steps: given.has('steps') ? f0.steps : 4,
        'decode-warmup': given.has('decode-warmup') ? f0['decode-warmup'] : 1,
      }
    : f0;
  const form = formOf(f);
  if (f.surrogate !== 'lowrank' && f.surrogate !== 'none') throw new UsageError(`--surrogate must be lowrank or none, got '${f.surrogate}'`);
  const surrogate: 'lowrank' | 'none' = f.surrogate;
  const targets = f.targets.split(',').map((t) => Number(t.trim()));
  if (targets.some((t) => !(t > 0 && t <= 1))) throw new UsageError(`--targets must be compute fractions in (0, 1], got '${f.targets}'`);
  const command = `npm run bench -- recipe ${argv.join(' ')}`.trimEnd();
  const w = new Workdir(f.keep);
  try {
    // 1. The quality fixture: calibration once, then each target's allocation and its NLL.
    const qModel = loadModel(f.model);
    const qIo = decoderIo(qModel);
    const qLayers = analyzeDecoder(qModel).layers.length;
    const readOpts = { model: f.model, vocabSize: qIo.vocabSize, maxLength: qIo.maxPositions ?? undefined };
    const calibSeqs = readDataset(f.calib, readOpts);
    const evalSeqs = readDataset(f.eval, readOpts);
    log(`dense eval of ${f.model} on ${f.eval}`);
    const dense = await evaluate(f.model, evalSeqs);
    log(`calibrating ${f.model} on ${f.calib} (as modc calibrate does: granularity auto, seed ${f.seed})`);
    const qdir = w.path('quality');
    mkdirSync(qdir, { recursive: true });
    // With surrogates, the bench model gets random ones of the chosen ranks: the speed depends on their shapes only.
    const calib = await Calibrator.prepare(qModel, calibSeqs, {
      targetCompute: 1,
      granularity: 'auto',
      seed: f.seed,
      workDir: join(qdir, 'work'),
      surrogate,
    });
    const results: CalibrationResult[] = [];
    const quality: TargetResult['quality'][] = [];
    try {
      for (const target of targets) {
        const result = await calib.finish({ targetCompute: target, granularity: 'auto' });
        results.push(result);
        const file = join(qdir, `routers-${target}.safetensors`);
        writeCalibratedRouters(file, result, routerFileMetadata(result, { path: f.calib, tokens: result.report.tokens, sequences: result.report.sequences }));
        const nll = async (mode: 'topk' | 'threshold') => {
          const m = loadModel(f.model);
          compile(m, {
            plan: planRouting({ numLayers: qLayers, hiddenSize: analyzeDecoder(m).hiddenSize, routers: { kind: 'file', path: file }, mode }),
            verify: false,
          });
          const out = join(qdir, `q-${target}-${mode}.onnx`);
          saveModel(m, out);
          const r = await evaluate(out, evalSeqs);
          return { deltaNll: r.nll - dense.nll, computeFraction: r.computeFraction };
        };
        quality.push({ topk: await nll('topk'), threshold: await nll('threshold') });
        log(
          `  F=${target}: ${describeParts(result)}; NLL ${signed(quality.at(-1)!.topk.deltaNll, 4)} (top-k), ${signed(quality.at(-1)!.threshold.deltaNll, 4)} (threshold)`,
        );
      }
    } finally {
      calib.release();
    }

    // 2. The bench model, its unit times (prefill and decode), and one compile per target.
    const totalSteps = f['decode-warmup'] + f.steps;
    const original = buildModel(w, f, Math.max(f.prompt, f['decode-prompt'] + totalSteps + 1));
    const opts = sessionOptions(f);
    const io = decoderIo(loadModel(original));
    const prefillPrompt = [tokenIds(f.prompt, f.vocab, 1234)];
    const decodePrompt = [tokenIds(f['decode-prompt'], f.vocab, 1234)];
    const forced = tokenIds(totalSteps, f.vocab, 99);
    const stepIds = (t: number) => [forced[t]!];
    const costs = layerCosts(original);
    log('timing the original layer by layer (prefill, then one decode step)');
    const unitsPrefill = await timeUnits(original, w.path('units-prefill'), originalFeeds(io, prefillPrompt[0]!, 0), f['unit-runs'], f.warmup, opts, {
      parts: true,
    });
    const unitsDecode = await timeUnits(original, w.path('units-decode'), originalFeeds(io, [forced[0]!], f['decode-prompt']), f['unit-runs'], 2, opts, {
      parts: true,
    });

    const rows: TargetResult[] = [];
    for (let i = 0; i < targets.length; i++) {
      const target = targets[i]!;
      const placed = place(results[i]!, qLayers, f.layers);
      const path = w.path(`recipe-${target}.onnx`);
      const plan0 = benchPlan(placed, f.hidden, f['router-seed']);
      compileModel(original, path, { plan: plan0 });
      const biases = await biasesForCapacity(w, path, plan0, decodePrompt, opts);
      compileModel(original, path, { plan: benchPlan(placed, f.hidden, f['router-seed'], biases) });

      log(`F=${target}: timing prefill against the original (2 sessions alive)`);
      const tp = await timePair(original, path, {
        prompt: prefillPrompt,
        rounds: f.warmup + f.runs,
        warmupRounds: f.warmup,
        steps: 0,
        warmupSteps: 0,
        stepIds: () => [],
        session: opts,
        gc: f.gc,
        processes: f.processes,
      });
      log(`F=${target}: timing decode against the original (2 sessions alive)`);
      const td = await timePair(original, path, {
        prompt: decodePrompt,
        rounds: 1,
        warmupRounds: 0,
        steps: totalSteps,
        warmupSteps: f['decode-warmup'],
        stepIds,
        session: opts,
        gc: f.gc,
        processes: f.processes,
      });
      const selPrefill = await measureSelections(w, path, { prompt: prefillPrompt, steps: 0, warmupSteps: 0, stepIds: () => [], session: opts });
      const selDecode = await measureSelections(w, path, { prompt: decodePrompt, steps: totalSteps, warmupSteps: f['decode-warmup'], stepIds, session: opts });
      // A skipped token of a part with a surrogate still runs the surrogate: it saves the part's
      // cost less the surrogate's (2 H rank MACs against the MLP's), by the cost model.
      const ranks = new Map(placed.flatMap((p) => p.layers.map((l) => [`${l}/${p.source.part}`, p.source.rank ?? 0] as const)));
      const kept = (layer: number, part: RoutedPart) => 1 - surrogateMacs({ rank: ranks.get(`${layer}/${part}`) ?? 0 }, f.hidden) / costs[layer]!.mlp;
      const replacedLayers = placed.filter((p) => p.source.capacity === 0).flatMap((p) => p.layers);
      const S = f.prompt;
      const savedPrefill =
        selPrefill.reduce(
          (a, s) =>
            a +
            (unitsPrefill.layers[s.layer]! / unitsPrefill.total) *
              partShare(costs[s.layer]!, s.part, S, (S + 1) / 2, unitsPrefill.parts?.[s.layer]) *
              (1 - s.promptFraction) *
              kept(s.layer, s.part),
          0,
        ) +
        replacedLayers.reduce(
          (a, l) => a + (unitsPrefill.layers[l]! / unitsPrefill.total) * partShare(costs[l]!, 'mlp', S, (S + 1) / 2, unitsPrefill.parts?.[l]) * kept(l, 'mlp'),
          0,
        );
      const skips = selDecode.map((s) => (s.steps ? 1 - s.stepsRun / s.steps : 0));
      const K = f['decode-prompt'] + 1;
      const savedDecode =
        selDecode.reduce(
          (a, s, k) =>
            a +
            (unitsDecode.layers[s.layer]! / unitsDecode.total) *
              partShare(costs[s.layer]!, s.part, 1, K, unitsDecode.parts?.[s.layer]) *
              skips[k]! *
              kept(s.layer, s.part),
          0,
        ) +
        replacedLayers.reduce(
          (a, l) => a + (unitsDecode.layers[l]! / unitsDecode.total) * partShare(costs[l]!, 'mlp', 1, K, unitsDecode.parts?.[l]) * kept(l, 'mlp'),
          0,
        );
      const pr = tp.ratios.prefill.wall.medianOfPaired;
      const dr = td.ratios.decode.wall.medianOfPaired;
      const q = quality[i]!;
      const row: TargetResult = {
        target,
        parts: describeParts(results[i]!),
        placed,
        quality: q,
        prefill: { t: tp, idealSpeedup: 1 / (1 - savedPrefill), achievedSpeedup: 1 / pr, achievedOverIdeal: (1 - savedPrefill) / pr },
        decode: {
          t: td,
          idealSpeedup: 1 / (1 - savedDecode),
          achievedSpeedup: 1 / dr,
          achievedOverIdeal: (1 - savedDecode) / dr,
          meanSkip: skips.length ? skips.reduce((a, b) => a + b, 0) / skips.length : 0,
        },
        headline: `at ${signed(q.topk.deltaNll, 3)} nats: ${(1 / pr).toFixed(2)}x prefill, ${(1 / dr).toFixed(2)}x decode`,
      };
      log(`F=${target}: ${row.headline}`);
      rows.push(row);
    }

    const mapping = Array.from({ length: qLayers }, (_, l) => `${l}->${mapLayers(l, qLayers, f.layers).join('/') || '-'}`).join(' ');
    const unmapped = Array.from({ length: qLayers }, (_, l) => l).filter((l) => mapLayers(l, qLayers, f.layers).length === 0);
    const wallMs = (xs: CallTime[]) => xs.map((x) => x.wallMs);
    if (f.json) {
      console.log(
        JSON.stringify(
          {
            bench: 'recipe',
            form,
            settings: {
              ...settingsJson(f, command),
              qualityModel: f.model,
              calib: f.calib,
              eval: f.eval,
              calibrate: { granularity: 'auto', seed: f.seed, surrogate, note: "modc calibrate's defaults otherwise" },
              prompt: f.prompt,
              prefillRounds: { warmup: f.warmup, timed: f.runs },
              decodePrompt: f['decode-prompt'],
              decodeSteps: { warmup: f['decode-warmup'], timed: f.steps },
              mapping: {
                rule: "quality layer l of L -> bench layers round(l L'/L) .. round((l+1) L'/L) - 1",
                from: qLayers,
                to: f.layers,
                layers: mapping,
                unmapped,
              },
            },
            denseNll: dense.nll,
            targets: rows.map((r) => ({
              target: r.target,
              parts: r.parts,
              placed: r.placed,
              quality: r.quality,
              prefill: {
                perRoundRatio: r.prefill.t.ratios.prefill.wall,
                cpu: r.prefill.t.ratios.prefill.cpu,
                achievedSpeedup: r.prefill.achievedSpeedup,
                idealSpeedup: r.prefill.idealSpeedup,
                achievedOverIdeal: r.prefill.achievedOverIdeal,
                originalMedianMs: median(wallMs(r.prefill.t.original.prefill)),
              },
              decode: {
                perStepRatio: r.decode.t.ratios.decode.wall,
                cpu: r.decode.t.ratios.decode.cpu,
                achievedSpeedup: r.decode.achievedSpeedup,
                idealSpeedup: r.decode.idealSpeedup,
                achievedOverIdeal: r.decode.achievedOverIdeal,
                meanSkip: r.decode.meanSkip,
                originalMedianStepMs: median(wallMs(r.decode.t.original.steps)),
              },
              headline: r.headline,
            })),
          },
          null,
          2,
        ),
      );
      return;
    }
    const out: string[] = [];
    out.push(`## Recipe: modc calibrate's choices on ${f.model}, placed on the ${form} bench model`, '');
    out.push(
      '```',
      `command: ${command}`,
      environment(f),
      modelLine(f),
      `quality: ${f.model} (${qLayers} layers), calibrated on ${f.calib} as modc calibrate does (granularity auto, seed ${f.seed}, surrogates ${surrogate}); NLL on ${f.eval}, dense ${dense.nll.toFixed(4)} nats/token`,
      `mapping: quality layer l of ${qLayers} -> bench layers round(l*${f.layers}/${qLayers}) .. round((l+1)*${f.layers}/${qLayers}) - 1: ${mapping}${unmapped.length ? ` (unmapped: ${unmapped.join(', ')})` : ''}`,
      `routed bench model: random routers seed ${f['router-seed']}, top-k at the calibrated capacities, ungated; biases set so r >= 0.5 selects about the capacity of the decode prompt's tokens; ${surrogate === 'lowrank' ? 'random surrogates of the calibrated ranks where calibrate chose one (+sR), MLPs it replaced (@0) replaced' : 'no surrogates (--surrogate none)'}`,
      `prefill: ${f.prompt}-token prompt, ${f.warmup} + ${f.runs} rounds; decode: ${f['decode-prompt']}-token prompt, ${f['decode-warmup']} + ${f.steps} steps; each against the original with only those two sessions alive, in ${f.processes} fresh process(es), samples pooled`,
      `units: original cut by analyzeDecoder -> splitFusedBoundaries -> extractDecoder (prefill ${ms(unitsPrefill.total)}, one decode step ${ms(unitsDecode.total, 2)}); parts' shares of a layer measured (each layer cut in two units: attention, and the rest)`,
      '```',
      '',
    );
    out.push(
      table(
        [
          'target F',
          'parts @ capacity (quality fixture)',
          'NLL increase (top-k, as timed)',
          'NLL increase (threshold)',
          'compute (top-k)',
          'prefill speedup (per-round ratios)',
          'prefill ideal',
          'prefill achieved / ideal',
          'decode speedup (per-step ratios)',
          'decode ideal',
          'decode achieved / ideal',
          'decode skip rate',
        ],
        rows.map((r) => [
          r.target.toFixed(2),
          r.parts,
          signed(r.quality.topk.deltaNll, 4),
          signed(r.quality.threshold.deltaNll, 4),
          r.quality.topk.computeFraction.toFixed(3),
          `${ratio(r.prefill.achievedSpeedup)} (ratio ${ratioSpan(r.prefill.t.ratios.prefill.wall)})`,
          ratio(r.prefill.idealSpeedup),
          r.prefill.achievedOverIdeal.toFixed(3),
          `${ratio(r.decode.achievedSpeedup)} (ratio ${ratioSpan(r.decode.t.ratios.decode.wall)})`,
          ratio(r.decode.idealSpeedup),
          r.decode.achievedOverIdeal.toFixed(3),
          pct(r.decode.meanSkip),
        ]),
      ),
      '',
    );
    for (const r of rows) out.push(`F=${r.target}: ${r.headline}`);
    console.log(out.join('\n'));
  } finally {
    w.dispose();
  }
}

/** An NLL change with its sign: +0.0021, -0.0013 (a calibrated model can beat the dense one on held-out data). */
function signed(x: number, digits: number): string {
  return `${x < 0 ? '-' : '+'}${Math.abs(x).toFixed(digits)}`;
}

/** "1@0.50 3a@0.75 5m@0.40+s32 6m@0+s16" (a = attention, m = MLP, none = block; +sR: a surrogate of rank R; @0: the MLP replaced by it). */
function describeParts(r: CalibrationResult): string {
  const routed = r.routers.map(
    (x) => `${x.layer}${x.part === 'block' ? '' : x.part === 'attention' ? 'a' : 'm'}@${x.capacity.toFixed(2)}${x.surrogate ? `+s${x.surrogate.rank}` : ''}`,
  );
  return [...routed, ...r.replaced.map((x) => `${x.layer}m@0+s${x.surrogate.rank}`)].join(' ');
}
