/**
 * Prefill benchmark: the original builder model of `--form` against its all-pass compile (every
 * layer's `--granularity` part converted, every token selected, ungated) and its routed compile
 * (random routers, top-k capacity c), each pair with only its two sessions alive; and the ideal
 * routed time from where the original spends its time, measured by running its layer units one
 * by one.
 *
 *   f_l            = t(layer unit l) / (t(prefix) + sum of t(layer units) + t(suffix))
 *   f_{l,p}        = f_l x the part's share of the layer by the cost model (a block: 1)
 *   ideal time     = original x (1 - sum over routed (l, p) of f_{l,p} x (1 - c_{l,p}))
 *   ideal speedup  = original / ideal;  achieved speedup = 1 / (median per-round ratio routed / original)
 *   ratio          = achieved / ideal   (target >= 0.9);  all-pass / original (target <= 1.05)
 *
 * c_{l,p} is the fraction of the prompt the routed model actually selected (its selection masks).
 * With last-position logits (`modc compile --logits last`, on by default as extra pairs) the same
 * formula is applied to the last-logits original, with its own unit times.
 */
import {
  applyQuick,
  buildModel,
  environment,
  flagHelp,
  formOf,
  granularityOf,
  lastLogitsModel,
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
  type UnitTimes,
} from './common.js';
import type { CallTime } from '../compiler/apps/benchmark/benchmark.js';
import { UsageError } from '../compiler/core/errors.js';
import { loadModel } from '../compiler/core/io/load.js';
import { decoderIo } from '../compiler/metadata/decoder-io.js';
import {
  type Compiled,
  compileAllPass,
  compileRouted,
  layerCosts,
  measureSelections,
  median,
  type PairTimes,
  type PartSelection,
  partShare,
  ratioSpan,
  timePair,
} from './pairs.js';

export const PREFILL_FLAGS = {
  ...modelFlags({ prompt: 1024, runs: 5, warmup: 2 }),
  'unit-runs': { kind: 'int', default: 5, help: 'timed runs of the layer-by-layer units (median per unit)', min: 1 },
  'last-logits': {
    kind: 'bool',
    default: true,
    help: 'also time the pairs compiled with --logits last (lm_head on the last token only) against the last-logits original; --no-last-logits skips them',
  },
  granularity: { kind: 'string', default: 'block', help: 'what a converted layer routes: block, attention or mlp' },
  schedule: { kind: 'string', default: 'uniform', help: 'layers the routed compile converts: uniform (every layer) or every-other' },
  gated: { kind: 'bool', default: false, help: 'route the routed compile gated (out = x + r (y - x))' },
  'all-pass': { kind: 'bool', default: true, help: 'time the all-pass compile; --no-all-pass skips it' },
  routed: { kind: 'bool', default: true, help: 'time the routed compile; --no-routed skips it' },
} satisfies FlagSpecs;

export const PREFILL_USAGE = `node dist/bench/run.js prefill [flags]   (npm run bench -- prefill [flags])

Times a batch-1 prefill of the original of --form against its all-pass compile (every layer's
--granularity part, ungated) and its routed compile (random routers, top-k capacity c), each
also with last-position logits (modc compile --logits last) against the last-logits original.
Every pair runs with only its two sessions alive, in --processes fresh processes one after
another (samples pooled), interleaved round by round (first model alternating). Prints per-round ratios (median, min, max), and for the routed model achieved /
ideal, the ideal from the original's per-layer unit times and the capacities the routed model
selected. --keep keeps the folder (original.onnx and weights.bin, all-pass.onnx, routed.onnx, ...).

${flagHelp(PREFILL_FLAGS)}`;

const TARGETS = { allPass: 1.05, achievedOverIdeal: 0.9 };

interface PairResult {
  c: Compiled;
  /** 'all' or 'last': which original it is timed against. */
  logits: 'all' | 'last';
  t: PairTimes;
}

export async function prefillBench(argv: readonly string[]): Promise<void> {
  const f = applyQuick(parseFlags(argv, PREFILL_FLAGS), argv, { 'unit-runs': 2 });
  const form = formOf(f);
  const granularity = granularityOf(f);
  if (f.schedule !== 'uniform' && f.schedule !== 'every-other') throw new UsageError(`--schedule must be uniform or every-other, got '${f.schedule}'`);
  if (!f['all-pass'] && !f.routed) throw new UsageError('--no-all-pass and --no-routed leave nothing to time');
  const command = `npm run bench -- prefill ${argv.join(' ')}`.trimEnd();
  const w = new Workdir(f.keep);
  try {
    const original = buildModel(w, f, f.prompt);
    const originalLast = f['last-logits'] ? lastLogitsModel(original, w.path('original-last.onnx')) : null;
    const routedChoice = { granularity, capacity: f.capacity, seed: f['router-seed'], schedule: f.schedule, gated: f.gated } as const;
    const compiled: { c: Compiled; logits: 'all' | 'last' }[] = [];
    for (const logits of originalLast ? (['all', 'last'] as const) : (['all'] as const)) {
      const suffix = logits === 'last' ? '-last' : '';
      if (f['all-pass']) compiled.push({ c: compileAllPass(w, original, granularity, `all-pass${suffix}`, logits), logits });
      if (f.routed) compiled.push({ c: compileRouted(w, original, routedChoice, `routed${suffix}`, logits), logits });
    }
    const opts = sessionOptions(f);
    const prompt = [tokenIds(f.prompt, f.vocab, 1234)];
    const pairs: PairResult[] = [];
    for (const { c, logits } of compiled) {
      const base = logits === 'last' ? originalLast! : original;
      log(`timing ${c.name} against ${logits === 'last' ? 'the last-logits original' : 'the original'} (2 sessions alive): ${f.warmup} + ${f.runs} rounds`);
      const t = await timePair(base, c.path, {
        prompt,
        rounds: f.warmup + f.runs,
        warmupRounds: f.warmup,
        steps: 0,
        warmupSteps: 0,
        stepIds: () => [],
        session: opts,
        gc: f.gc,
        processes: f.processes,
      });
      log(`${c.name}: per-round ratio ${ratioSpan(t.ratios.prefill.wall)}`);
      pairs.push({ c, logits, t });
    }

    // What each routed model selected on the prompt (one more untimed run each).
    const selections = new Map<string, PartSelection[]>();
    for (const { c } of compiled)
      if (c.name.startsWith('routed'))
        selections.set(c.name, await measureSelections(w, c.path, { prompt, steps: 0, warmupSteps: 0, stepIds: () => [], session: opts }));

    log('timing the original layer by layer');
    const feeds = originalFeeds(decoderIo(loadModel(original)), prompt[0]!, 0);
    const units = await timeUnits(original, w.path('units'), feeds, f['unit-runs'], f.warmup, opts, { parts: granularity !== 'block' });
    const unitsLast = originalLast
      ? await timeUnits(originalLast, w.path('units-last'), feeds, f['unit-runs'], f.warmup, opts, { parts: granularity !== 'block' })
      : null;
    const costs = layerCosts(original);
    const S = f.prompt;
    const speedup = (p: PairResult) => {
      const u = p.logits === 'last' ? unitsLast! : units;
      const sel = selections.get(p.c.name) ?? [];
      const parts = sel.map((s) => ({ ...s, f: (u.layers[s.layer]! / u.total) * partShare(costs[s.layer]!, s.part, S, (S + 1) / 2, u.parts?.[s.layer]) }));
      const saved = parts.reduce((a, x) => a + x.f * (1 - x.promptFraction), 0);
      const r = p.t.ratios.prefill;
      return {
        model: p.c.name,
        logits: p.logits,
        routedShare: parts.reduce((a, x) => a + x.f, 0),
        meanCapacity: parts.length ? parts.reduce((a, x) => a + x.promptFraction, 0) / parts.length : NaN,
        suffixShare: u.suffix / u.total,
        idealRatio: 1 - saved,
        idealSpeedup: 1 / (1 - saved),
        achievedSpeedup: 1 / r.wall.medianOfPaired,
        achievedOverIdeal: (1 - saved) / r.wall.medianOfPaired,
        achievedOverIdealOfMedians: (1 - saved) / r.wall.ofMedians,
        achievedOverIdealCpu: (1 - saved) / r.cpu.medianOfPaired,
        parts,
      };
    };
    const routedRows = pairs.filter((p) => p.c.name.startsWith('routed')).map(speedup);
    const allPassPair = pairs.find((p) => p.c.name === 'all-pass');
    const allPassRatio = allPassPair ? allPassPair.t.ratios.prefill.wall.medianOfPaired : NaN;
    const wallMs = (xs: CallTime[]) => xs.map((x) => x.wallMs);
    const gcMs = pairs.flatMap((p) => p.t.gcMs);

    if (f.json) {
      console.log(
        JSON.stringify(
          {
            bench: 'prefill',
            form,
            settings: {
              ...settingsJson(f, command),
              batch: 1,
              prompt: f.prompt,
              warmup: f.warmup,
              runs: f.runs,
              granularity,
              order:
                'pairs (original, compiled), only those two sessions alive, each pair in --processes fresh processes (samples pooled); interleaved round by round, first model alternating',
              processes: f.processes,
              gcMedianMs: median(gcMs),
            },
            pairs: pairs.map(({ c, logits, t }) => ({
              model: c.name,
              label: c.label,
              logits,
              liveSessions: 2,
              parts: c.parts,
              perRoundRatio: { wall: t.ratios.prefill.wall, cpu: t.ratios.prefill.cpu },
              original: { median: median(wallMs(t.original.prefill)), samples: wallMs(t.original.prefill) },
              compiled: { median: median(wallMs(t.compiled.prefill)), samples: wallMs(t.compiled.prefill) },
            })),
            routed: routedRows,
            targets: {
              allPassPerRoundRatio: { value: allPassRatio, target: TARGETS.allPass, met: allPassRatio <= TARGETS.allPass },
              routedAchievedOverIdeal: routedRows.map((r) => ({
                logits: r.logits,
                value: r.achievedOverIdeal,
                target: TARGETS.achievedOverIdeal,
                met: r.achievedOverIdeal >= TARGETS.achievedOverIdeal,
              })),
            },
            units: { prefix: units.prefix, layers: units.layers, suffix: units.suffix, total: units.total },
            unitsLastLogits: unitsLast,
          },
          null,
          2,
        ),
      );
      return;
    }

    const yesNo = (ok: boolean) => (ok ? 'yes' : '**no**');
    const out: string[] = [];
    out.push(`## Prefill: ${form} form, ${f.prompt}-token prompt, batch 1, granularity ${granularity}`, '');
    out.push(
      '```',
      `command: ${command}`,
      environment(f),
      modelLine(f),
      ...compiled.map(
        ({ c, logits }) => `${c.name}: ${c.label}${logits === 'last' ? ', last-position logits' : ''} (compile ${(c.compileMs / 1000).toFixed(1)} s)`,
      ),
      `timing: ModSession.forward (feeds + session.run + logits); each compiled model against its original (same logits) with only those two sessions alive, in ${f.processes} fresh process(es) one after another, samples pooled (created, timed, released, then the next pair); ${f.warmup} warm-up + ${f.runs} timed rounds per process, first model alternating`,
      f.gc ? `garbage collected before every run, outside the timing (median ${ms(median(gcMs), 1)} per collection)` : 'garbage collection left to V8',
      `units: original cut by analyzeDecoder -> splitFusedBoundaries -> extractDecoder, run by LayerByLayerRunner on the same prompt; ${f.warmup} warm-up + ${f['unit-runs']} timed runs, median per unit`,
      '```',
      '',
    );
    out.push(`Per-round ratio compiled / its original (${f.runs} timed rounds per pair):`, '');
    out.push(
      table(
        [
          'model',
          'logits',
          'original median',
          'compiled median',
          'per-round ratio: median',
          'min',
          'max',
          'CPU per-round ratio: median (min - max)',
          'ratio of medians',
          'target',
          'met',
        ],
        pairs.map(({ c, logits, t }) => {
          const r = t.ratios.prefill.wall;
          const isAllPass = c.name === 'all-pass';
          return [
            c.label,
            logits,
            ms(median(wallMs(t.original.prefill))),
            ms(median(wallMs(t.compiled.prefill))),
            ratio(r.medianOfPaired),
            ratio(r.paired.min),
            ratio(r.paired.max),
            ratioSpan(t.ratios.prefill.cpu),
            ratio(r.ofMedians),
            isAllPass ? `<= ${TARGETS.allPass}x` : '',
            isAllPass ? yesNo(r.medianOfPaired <= TARGETS.allPass) : '',
          ];
        }),
      ),
      '',
    );
    if (routedRows.length) {
      out.push(
        'Routed model against its ideal (ideal = original x (1 - sum f_{l,p} (1 - c_{l,p})), f from the unit times of the original with the same logits):',
        '',
      );
      out.push(
        table(
          [
            'logits',
            'suffix share (lm_head)',
            "f (routed parts' share)",
            'mean capacity selected',
            'ideal speedup',
            'achieved speedup (per-round ratios)',
            'achieved / ideal',
            'target',
            'met',
            'achieved / ideal (ratio of medians)',
            'achieved / ideal (CPU)',
          ],
          routedRows.map((r) => [
            r.logits,
            pct(r.suffixShare),
            pct(r.routedShare),
            r.meanCapacity.toFixed(3),
            ratio(r.idealSpeedup),
            ratio(r.achievedSpeedup),
            r.achievedOverIdeal.toFixed(3),
            `>= ${TARGETS.achievedOverIdeal}`,
            yesNo(r.achievedOverIdeal >= TARGETS.achievedOverIdeal),
            r.achievedOverIdealOfMedians.toFixed(3),
            r.achievedOverIdealCpu.toFixed(3),
          ]),
        ),
        '',
      );
    }
    const lastCols = (pick: (u: UnitTimes) => number) => (unitsLast ? [ms(pick(unitsLast)), pct(pick(unitsLast) / unitsLast.total)] : []);
    const sel = selections.get('routed') ?? [];
    out.push(
      `Per-unit times of the original (median of ${f['unit-runs']}; unit sum ${ms(units.total)}${unitsLast ? `, with last-position logits ${ms(unitsLast.total)}` : ''}):`,
      '',
    );
    out.push(
      table(
        ['unit', 'median', 'share of unit sum', 'routed parts', 'capacity selected', ...(unitsLast ? ['median (last logits)', 'share (last logits)'] : [])],
        [
          ['prefix (embedding, mask, rotary)', ms(units.prefix), pct(units.prefix / units.total), '', '', ...lastCols((u) => u.prefix)],
          ...units.layers.map((t, l) => [
            `layer ${l}`,
            ms(t),
            pct(t / units.total),
            sel
              .filter((s) => s.layer === l)
              .map((s) => s.part)
              .join(', '),
            sel
              .filter((s) => s.layer === l)
              .map((s) => s.promptFraction.toFixed(3))
              .join(', '),
            ...lastCols((u) => u.layers[l]!),
          ]),
          ['suffix (final norm, lm_head)', ms(units.suffix), pct(units.suffix / units.total), '', '', ...lastCols((u) => u.suffix)],
        ],
      ),
      '',
    );
    out.push(
      'Raw timed rounds (ms):',
      '',
      ...pairs.flatMap(({ c, t }) => [
        `- ${c.name} pair, original: ${wallMs(t.original.prefill)
          .map((x) => x.toFixed(0))
          .join(', ')}`,
        `- ${c.name} pair, ${c.name}: ${wallMs(t.compiled.prefill)
          .map((x) => x.toFixed(0))
          .join(', ')}`,
      ]),
    );
    console.log(out.join('\n'));
  } finally {
    w.dispose();
  }
}
