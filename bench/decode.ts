/**
 * Decode benchmark: a long prompt, then token-by-token decoding, for the original builder model
 * of `--form` and each compiled model: the all-pass compile (every layer's `--granularity` part
 * converted, every token selected, ungated) and the routed compile (random routers, top-k
 * capacity c on the prompt; a one-token step selects its token iff r >= 0.5, SPEC.md, so about
 * half of them). Each compiled model is timed against the original with only those two sessions
 * alive (created, timed interleaved step by step, released; then the next pair).
 *
 *   per-step ratio     = compiled step time / original step time, the same step of the same pair
 *   d_l                = t(layer unit l) / t(all units) for one decode step of the original at the
 *                        same context (prefix, layers and suffix timed one by one)
 *   d_{l,p}            = d_l x the part's share of the layer by the cost model (a block: 1)
 *   skip_{l,p}         = share of the timed steps in which part p of layer l selected no row's token
 *   ideal              = original x (1 - sum over routed (l, p) of d_{l,p} x skip_{l,p})
 *   achieved / ideal   = (original / routed) / (original / ideal) = (1 - saved) / (routed / original)
 *
 *   KV ideal (exact)   = sum over layers l of (tokens in l's cache) x 2 x kv_heads x head_size x bytes
 */
import {
  applyQuick,
  buildModel,
  environment,
  flagHelp,
  formOf,
  granularityOf,
  log,
  mean,
  mib,
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
import { type CallTime } from '../compiler/apps/benchmark/benchmark.js';
import { UsageError } from '../compiler/core/errors.js';
import { decoderIo } from '../compiler/metadata/decoder-io.js';
import { loadModel } from '../compiler/core/io/load.js';
import {
  type Compiled,
  compileAllPass,
  compileRouted,
  layerCosts,
  measureSelections,
  median,
  type PairTimes,
  partShare,
  ratioSpan,
  spread,
  timePair,
} from './pairs.js';

export const DECODE_FLAGS = {
  ...modelFlags({ prompt: 2047, runs: 32, warmup: 3 }),
  runs: { kind: 'int', default: 32, help: 'timed decode steps per pair (per-token latency and per-step ratios over them)', min: 1 },
  warmup: { kind: 'int', default: 3, help: 'untimed decode steps right after the prefill' },
  prompt: { kind: 'int', default: 2047, help: 'prompt tokens per row (context = prompt + 1 at the first step)', min: 1 },
  'unit-runs': { kind: 'int', default: 9, help: 'timed runs of the layer-by-layer units on one decode step (median per unit)', min: 1 },
  batch: { kind: 'int', default: 1, help: 'rows (each its own seeded prompt of --prompt tokens, no padding)', min: 1 },
  granularity: { kind: 'string', default: 'block', help: 'what a converted layer routes: block, attention or mlp' },
  schedule: { kind: 'string', default: 'uniform', help: 'layers the routed compile converts: uniform (every layer) or every-other' },
  gated: { kind: 'bool', default: false, help: 'route the routed compile gated (out = x + r (y - x))' },
  grow: {
    kind: 'bool',
    default: false,
    help: 'let the context grow by a token at every step; by default every step starts from the prefilled caches, at context --prompt + 1',
  },
  'all-pass': { kind: 'bool', default: true, help: 'time the all-pass compile; --no-all-pass skips it' },
  routed: { kind: 'bool', default: true, help: 'time the routed compile; --no-routed skips it' },
} satisfies FlagSpecs;

export const DECODE_USAGE = `node dist/bench/run.js decode [flags]   (npm run bench -- decode [flags])

Builds the original of --form with random non-zero weights, compiles the all-pass model (every
layer's --granularity part, ungated) and the routed model (random routers, top-k capacity c on
the prompt, about half of the decode tokens), then times each compiled model against the
original with only those two sessions alive, in --processes fresh processes one after another
(samples pooled): both prefill the prompt, then take --warmup untimed and --runs timed decode
steps with forced seeded ids, interleaved step by step (first model alternating), each step from
the prefilled caches (so at context --prompt + 1; --grow appends instead). Prints per-step ratios (compiled / original, the same step of the same
pair): median, min and max, on wall and process CPU time; KV bytes against their ideal; and for
the routed model achieved / ideal, the ideal from the original's per-layer unit times and the
skip rates the routed model showed (its selection masks, read in one more untimed run).
--keep keeps the folder: original.onnx and weights.bin, all-pass.onnx, routed.onnx.

${flagHelp(DECODE_FLAGS)}`;

/** The all-pass target: 1.05x at batch 1, 1.10x with more rows (the speed targets' batch-4 bound). */
const TARGETS = { allPass: 1.05, allPassBatched: 1.1, achievedOverIdeal: 0.9 };

export async function decodeBench(argv: readonly string[]): Promise<void> {
  const f = applyQuick(parseFlags(argv, DECODE_FLAGS), argv, { prompt: 255, runs: 8, warmup: 2, 'unit-runs': 3 });
  const form = formOf(f);
  const granularity = granularityOf(f);
  if (f.schedule !== 'uniform' && f.schedule !== 'every-other') throw new UsageError(`--schedule must be uniform or every-other, got '${f.schedule}'`);
  if (!f['all-pass'] && !f.routed) throw new UsageError('--no-all-pass and --no-routed leave nothing to time');
  const command = `npm run bench -- decode ${argv.join(' ')}`.trimEnd();
  const w = new Workdir(f.keep);
  try {
    const B = f.batch;
    const totalSteps = f.warmup + f.runs;
    const rewind = !f.grow;
    const stepsAtEnd = rewind ? 1 : totalSteps;
    const total = f.prompt + stepsAtEnd;
    const originalPath = buildModel(w, f, total + 1);
    const compiled: Compiled[] = [];
    if (f['all-pass']) compiled.push(compileAllPass(w, originalPath, granularity));
    const routed = f.routed
      ? compileRouted(w, originalPath, { granularity, capacity: f.capacity, seed: f['router-seed'], schedule: f.schedule, gated: f.gated })
      : null;
    if (routed) compiled.push(routed);
    const opts = sessionOptions(f);
    const prompt = Array.from({ length: B }, (_, b) => tokenIds(f.prompt, f.vocab, 1234 + b));
    const forcedRows = Array.from({ length: B }, (_, b) => tokenIds(totalSteps, f.vocab, 99 + b));
    const stepIds = (t: number) => forcedRows.map((r) => r[t]!);

    const pairs: { c: Compiled; t: PairTimes }[] = [];
    for (const c of compiled) {
      log(`timing ${c.name} against the original (2 sessions alive): prefill, ${f.warmup} + ${f.runs} steps`);
      const t = await timePair(originalPath, c.path, {
        prompt,
        rounds: 1,
        warmupRounds: 0,
        steps: totalSteps,
        warmupSteps: f.warmup,
        stepIds,
        session: opts,
        gc: f.gc,
        rewind,
        processes: f.processes,
      });
      log(`${c.name}: per-step ratio ${ratioSpan(t.ratios.decode.wall)} wall, ${ratioSpan(t.ratios.decode.cpu)} CPU`);
      pairs.push({ c, t });
    }

    // What the routed model selected, at the same prompt and steps, in one more untimed run.
    const selections = routed
      ? await measureSelections(w, routed.path, { prompt, steps: totalSteps, warmupSteps: f.warmup, stepIds, session: opts, rewind })
      : [];

    log('timing one decode step of the original layer by layer');
    const io = decoderIo(loadModel(originalPath));
    const units = await timeUnits(originalPath, w.path('units'), originalFeeds(io, [stepIds(0)[0]!], f.prompt, B), f['unit-runs'], 2, opts, {
      parts: granularity !== 'block',
    });
    const share = units.layers.map((t) => t / units.total);
    const costs = layerCosts(originalPath);
    const context = f.prompt + 1;
    const routedParts = selections.map((s) => {
      const dShare = share[s.layer]! * partShare(costs[s.layer]!, s.part, 1, context, units.parts?.[s.layer]);
      const skip = s.steps ? 1 - s.stepsRun / s.steps : 0;
      return { ...s, d: dShare, skip };
    });
    const saved = routedParts.reduce((a, p) => a + p.d * p.skip, 0);
    const routedPair = pairs.find((p) => p.c === routed);
    const wallMs = (xs: CallTime[]) => xs.map((x) => x.wallMs);
    const cpuMs = (xs: CallTime[]) => xs.map((x) => x.cpuMs);
    const idealRow = routedPair
      ? (() => {
          const r = routedPair.t.ratios.decode;
          const oMed = median(wallMs(routedPair.t.original.steps));
          return {
            d: routedParts.reduce((a, p) => a + p.d, 0),
            meanSkip: mean(routedParts.map((p) => p.skip)),
            idealRatio: 1 - saved,
            idealSpeedup: 1 / (1 - saved),
            idealMs: oMed * (1 - saved),
            achievedSpeedup: 1 / r.wall.medianOfPaired,
            achievedOverIdeal: (1 - saved) / r.wall.medianOfPaired,
            achievedOverIdealOfMedians: (1 - saved) / r.wall.ofMedians,
            achievedOverIdealCpu: (1 - saved) / r.cpu.medianOfPaired,
          };
        })()
      : null;

    const kvBytesPerToken = io.kv.map((b) => 2 * b.numHeads * b.headSize * (b.dtype === 'float16' ? 2 : 4));
    const exactIdeal = (lens: number[][]) => lens.reduce((a, rows, l) => a + rows.reduce((x, n) => x + n, 0) * kvBytesPerToken[l]!, 0);
    const allPassPair = pairs.find((p) => p.c.name === 'all-pass');
    const allPassRatio = allPassPair ? allPassPair.t.ratios.decode.wall.medianOfPaired : NaN;
    const allPassTarget = B > 1 ? TARGETS.allPassBatched : TARGETS.allPass;
    const settings = {
      ...settingsJson(f, command),
      batch: B,
      prompt: f.prompt,
      warmupSteps: f.warmup,
      timedSteps: f.runs,
      context: rewind ? 'every step from the prefilled caches' : 'growing',
      granularity,
      order:
        'pairs (original, compiled), only those two sessions alive, each pair in --processes fresh processes (samples pooled; every other process creates the compiled session first); each pair prefilled, then interleaved step by step, first model alternating',
      processes: f.processes,
      gcMedianMs: median(pairs.flatMap((p) => p.t.gcMs)),
    };

    if (f.json) {
      const side = (s: PairTimes['original']) => ({
        prefillMs: s.prefill[0]?.wallMs ?? null,
        step: spread(wallMs(s.steps)),
        cpuStep: spread(cpuMs(s.steps)),
        kvBytesAfterPrefill: s.kvAfterPrefill,
        kvBytesAtEnd: s.kvAtEnd,
        steps: wallMs(s.steps),
        cpuSteps: cpuMs(s.steps),
      });
      console.log(
        JSON.stringify(
          {
            bench: 'decode',
            form,
            settings,
            pairs: pairs.map(({ c, t }) => ({
              model: c.name,
              label: c.label,
              liveSessions: 2,
              parts: c.parts,
              perStepRatio: { wall: t.ratios.decode.wall, cpu: t.ratios.decode.cpu },
              perStepRatioByOrder: t.byOrder,
              original: side(t.original),
              compiled: side(t.compiled),
              cacheLengthsAtEnd: t.compiled.lengthsAtEnd,
            })),
            routed: routedPair
              ? {
                  parts: routedParts,
                  ideal: idealRow,
                  kv: {
                    afterPrefill: {
                      original: routedPair.t.original.kvAfterPrefill,
                      routed: routedPair.t.compiled.kvAfterPrefill,
                      exactIdeal: exactIdeal(routedPair.t.compiled.lengthsAfterPrefill),
                    },
                    atEnd: {
                      original: routedPair.t.original.kvAtEnd,
                      routed: routedPair.t.compiled.kvAtEnd,
                      exactIdeal: exactIdeal(routedPair.t.compiled.lengthsAtEnd),
                    },
                  },
                }
              : null,
            targets: {
              allPassPerStepRatio: { value: allPassRatio, target: allPassTarget, met: allPassRatio <= allPassTarget },
              routedAchievedOverIdeal: idealRow
                ? { value: idealRow.achievedOverIdeal, target: TARGETS.achievedOverIdeal, met: idealRow.achievedOverIdeal >= TARGETS.achievedOverIdeal }
                : null,
            },
            units: { prefix: units.prefix, layers: units.layers, suffix: units.suffix, total: units.total },
          },
          null,
          2,
        ),
      );
      return;
    }

    const yesNo = (ok: boolean) => (ok ? 'yes' : '**no**');
    const span = (xs: number[]) => `${Math.min(...xs).toFixed(1)} - ${Math.max(...xs).toFixed(1)} ms`;
    const out: string[] = [];
    out.push(`## Decode: ${form} form, ${f.prompt}-token prompt, then ${f.warmup} + ${f.runs} decode steps, batch ${B}, granularity ${granularity}`, '');
    out.push(
      '```',
      `command: ${command}`,
      environment(f),
      modelLine(f),
      ...compiled.map((c) => `${c.label} (compile ${(c.compileMs / 1000).toFixed(1)} s)`),
      `timing: ModSession.step (feeds + session.run + logits) with forced seeded token ids; each compiled model against the original with only those two sessions alive, in ${f.processes} fresh process(es) one after another, samples pooled (created, every other process the compiled one first; timed; released; then the next); both prefilled, then interleaved step by step (first model alternating): ${f.warmup} untimed steps, then ${f.runs} timed per process; ${rewind ? `every step from the prefilled caches (ModSession.checkpoint / restore, outside the timing), at context ${f.prompt + 1}` : `context ${f.prompt + 1} at the first step, ${total} after the last`}`,
      f.gc ? `garbage collected before every call, outside the timing (median ${ms(settings.gcMedianMs, 1)} per collection)` : 'garbage collection left to V8',
      `units: one decode step of the original at past length ${f.prompt} (zero K/V), batch ${B}, cut by analyzeDecoder -> splitFusedBoundaries -> extractDecoder and run by LayerByLayerRunner; 2 warm-up + ${f['unit-runs']} timed runs, median per unit${units.parts ? "; a part's share of its layer measured the same way, each layer cut in two units (attention, and the rest)" : ''}`,
      '```',
      '',
    );
    out.push(`Per-step ratio compiled / original (${f.runs} timed steps per pair; the same step of the same pair):`, '');
    out.push(
      table(
        [
          'model',
          'original median step',
          'compiled median step',
          'compiled min - max',
          'per-step ratio: median',
          'min',
          'max',
          'CPU per-step ratio: median (min - max)',
          'ratio of medians',
          'target',
          'met',
        ],
        pairs.map(({ c, t }) => {
          const r = t.ratios.decode.wall;
          const isAllPass = c.name === 'all-pass';
          return [
            c.label,
            ms(median(wallMs(t.original.steps)), 2),
            ms(median(wallMs(t.compiled.steps)), 2),
            span(wallMs(t.compiled.steps)),
            ratio(r.medianOfPaired),
            ratio(r.paired.min),
            ratio(r.paired.max),
            ratioSpan(t.ratios.decode.cpu),
            ratio(r.ofMedians),
            isAllPass ? `<= ${allPassTarget.toFixed(2)}x` : '',
            isAllPass ? yesNo(r.medianOfPaired <= allPassTarget) : '',
          ];
        }),
      ),
      '',
    );
    const ordered = pairs.filter(({ t }) => t.byOrder);
    if (ordered.length) {
      out.push(
        'By the session created first (median per-step ratio over the processes of each order): ' +
          ordered
            .map(({ c, t }) => `${c.name} ${ratio(t.byOrder!.originalFirst)} original first, ${ratio(t.byOrder!.compiledFirst)} compiled first`)
            .join('; '),
        '',
      );
    }
    if (routedPair && idealRow) {
      out.push('Routed model against its ideal (ideal = original x (1 - sum over routed parts of d_{l,p} x skip_{l,p})):', '');
      out.push(
        table(
          [
            "d (routed parts' share of a step)",
            'mean skip rate',
            'ideal speedup',
            'achieved speedup (per-step ratios)',
            'achieved / ideal',
            'target',
            'met',
            'achieved / ideal (ratio of medians)',
            'achieved / ideal (CPU)',
          ],
          [
            [
              pct(idealRow.d),
              pct(idealRow.meanSkip),
              ratio(idealRow.idealSpeedup),
              ratio(idealRow.achievedSpeedup),
              idealRow.achievedOverIdeal.toFixed(3),
              `>= ${TARGETS.achievedOverIdeal}`,
              yesNo(idealRow.achievedOverIdeal >= TARGETS.achievedOverIdeal),
              idealRow.achievedOverIdealOfMedians.toFixed(3),
              idealRow.achievedOverIdealCpu.toFixed(3),
            ],
          ],
        ),
        '',
      );
      const t = routedPair.t;
      const kvRow = (label: string, o: number, r: number, lens: number[][]) => [
        label,
        mib(o),
        mib(r),
        ratio(r / o),
        mib(exactIdeal(lens)),
        ratio(r / exactIdeal(lens)),
      ];
      out.push('KV cache of the routed model (ModSession.kvBytes; exact ideal: cached tokens x bytes per token, summed over layers and rows):', '');
      out.push(
        table(
          ['after', 'original', 'routed', 'routed / original', 'ideal (exact)', 'routed / ideal'],
          [
            kvRow(`prefill (${f.prompt} tokens)`, t.original.kvAfterPrefill, t.compiled.kvAfterPrefill, t.compiled.lengthsAfterPrefill),
            kvRow(
              `prefill + ${stepsAtEnd} step${stepsAtEnd === 1 ? '' : 's'} (${total} tokens)`,
              t.original.kvAtEnd,
              t.compiled.kvAtEnd,
              t.compiled.lengthsAtEnd,
            ),
          ],
        ),
        '',
      );
    }
    out.push(
      `Per layer (decode-step unit times of the original, median of ${f['unit-runs']}; unit sum ${ms(units.total, 2)}${routedPair ? `; routed parts: prompt selection, timed steps run, d_{l,p}` : ''}):`,
      '',
    );
    const partsOf = (l: number) => routedParts.filter((p) => p.layer === l);
    out.push(
      table(
        ['unit', 'decode-step time', 'share d_l', 'routed parts', 'prompt selected', 'steps run', 'd_{l,p}'],
        [
          ['prefix', ms(units.prefix, 2), pct(units.prefix / units.total), '', '', '', ''],
          ...units.layers.map((t, l) => [
            `layer ${l}`,
            ms(t, 2),
            pct(share[l]!),
            partsOf(l)
              .map((p) => p.part)
              .join(', '),
            partsOf(l)
              .map((p) => p.promptFraction.toFixed(3))
              .join(', '),
            partsOf(l)
              .map((p) => `${p.stepsRun}/${p.steps}`)
              .join(', '),
            partsOf(l)
              .map((p) => pct(p.d))
              .join(', '),
          ]),
          ['suffix', ms(units.suffix, 2), pct(units.suffix / units.total), '', '', '', ''],
        ],
      ),
      '',
    );
    out.push(
      'Raw timed steps (ms):',
      '',
      ...pairs.flatMap(({ c, t }) => [
        `- ${c.name} pair, original: ${wallMs(t.original.steps)
          .map((x) => x.toFixed(1))
          .join(', ')}`,
        `- ${c.name} pair, ${c.name}: ${wallMs(t.compiled.steps)
          .map((x) => x.toFixed(1))
          .join(', ')}`,
      ]),
    );
    console.log(out.join('\n'));
  } finally {
    w.dispose();
  }
}
