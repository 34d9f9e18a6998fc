/**
 * Prefill benchmark ("MoD compile"): the original builder model, the all-pass compile (every
 * layer converted, every token selected, ungated) and the MoD compile (top-k capacity c on
 * every other layer, gated, random routers), timed on one prompt; and the ideal MoD time from
 * where the original spends its time, measured by running its layer units one by one.
 *
 *   f_l            = t(layer unit l) / (t(prefix) + sum of t(layer units) + t(suffix))
 *   ideal time     = original x (1 - sum over converted l of f_l x (1 - c_l))
 *                    (= original x (1 - f x (1 - c)) for one capacity c and f = sum of f_l)
 *   ideal speedup  = original / ideal;  achieved speedup = original / compiled
 *   ratio          = achieved / ideal   (target >= 0.9);  all-pass / original (target <= 1.05)
 *
 * c_l is the capacity the compiled model actually used (its cache lengths after the prompt).
 *
 * With last-position logits (`modc compile --logits last`, on by default here as extra models)
 * the same formula is applied to the last-logits original: its own units are timed (the suffix
 * now runs the lm_head on one position), so f_l is each layer's share of that smaller total.
 */
import {
  collectGarbage,
  environment,
  flagHelp,
  lastLogitsModel,
  log,
  median,
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
  applyQuick,
  buildModel,
  compileModel,
  type FlagSpecs,
  type UnitTimes,
} from './common.js';
import { medianOfPaired, rotation } from '../compiler/apps/benchmark/benchmark.js';
import { ModSession } from '../compiler/runtime/session.js';

export const PREFILL_FLAGS = {
  ...modelFlags({ prompt: 1024, runs: 5, warmup: 2 }),
  'unit-runs': { kind: 'int', default: 5, help: 'timed runs of the layer-by-layer units (median per unit)' },
  'last-logits': {
    kind: 'bool',
    default: true,
    help: 'also time the original, all-pass and MoD models compiled with --logits last (lm_head on the last token only); --no-last-logits skips them',
  },
} satisfies FlagSpecs;

export const PREFILL_USAGE = `node dist/bench/run.js prefill [flags]

Times a batch-1 prefill: original, all-pass compile (every layer, ungated) and MoD compile (top-k
capacity c on every other layer, gated, random routers), each also with last-position logits
(modc compile --logits last), interleaved run by run with the first model rotating; and derives
the ideal MoD time from the original's per-layer unit times.

${flagHelp(PREFILL_FLAGS)}`;

interface Variant {
  name: string;
  label: string;
  path: string;
  session?: ModSession;
  samples: number[];
}

export async function prefillBench(argv: readonly string[]): Promise<void> {
  const f = applyQuick(parseFlags(argv, PREFILL_FLAGS), argv, { 'unit-runs': 2 });
  const command = `npm run bench -- prefill ${argv.join(' ')}`.trimEnd();
  const w = new Workdir(f.keep);
  try {
    const original = buildModel(w, f);
    const allPassChoice = { routers: { kind: 'all-pass' }, gated: false } as const;
    const modChoice = {
      routers: { kind: 'random', seed: f['router-seed'] },
      mode: 'topk',
      capacity: f.capacity,
      schedule: 'every-other',
      gated: true,
    } as const;
    const allPassCompile = compileModel(original, w.path('all-pass.onnx'), allPassChoice);
    const modCompile = compileModel(original, w.path('mod.onnx'), modChoice);
    const converted = modCompile.plan.layers.map((l) => l.layer);
    const L = f.layers;
    const allLabel = `all-pass (${allPassCompile.plan.layers.length}/${L} layers, ungated)`;
    const modLabel = `MoD c=${f.capacity}, every other layer (${converted.length}/${L}, gated)`;
    const variants: Variant[] = [
      { name: 'original', label: 'original', path: original, samples: [] },
      { name: 'all-pass', label: allLabel, path: w.path('all-pass.onnx'), samples: [] },
      { name: 'mod', label: modLabel, path: w.path('mod.onnx'), samples: [] },
    ];
    if (f['last-logits']) {
      variants.push({
        name: 'original-last',
        label: 'original, last-position logits',
        path: lastLogitsModel(original, w.path('original-last.onnx')),
        samples: [],
      });
      compileModel(original, w.path('all-pass-last.onnx'), allPassChoice, 'last');
      variants.push({ name: 'all-pass-last', label: `${allLabel}, last-position logits`, path: w.path('all-pass-last.onnx'), samples: [] });
      compileModel(original, w.path('mod-last.onnx'), modChoice, 'last');
      variants.push({ name: 'mod-last', label: `${modLabel}, last-position logits`, path: w.path('mod-last.onnx'), samples: [] });
    }
    const byName = (n: string) => variants.find((v) => v.name === n)!;

    const opts = sessionOptions(f);
    for (const v of variants) v.session = await ModSession.create(v.path, opts);
    const prompt = [tokenIds(f.prompt, f.vocab, 1234)];
    const gcMs: number[] = [];
    // Warm-up, then timed rounds; in each round every model runs once, the first one rotating,
    // so that drift hits all alike and each round gives paired ratios.
    for (let r = 0; r < f.warmup + f.runs; r++) {
      for (const i of rotation(variants.length, r)) {
        const v = variants[i]!;
        if (f.gc) gcMs.push(collectGarbage());
        const t0 = performance.now();
        await v.session!.forward(prompt);
        const t = performance.now() - t0;
        if (r >= f.warmup) v.samples.push(t);
      }
      log(`${r < f.warmup ? 'warm-up' : 'run'} ${r + 1}: ${variants.map((v) => `${v.name} ${v.samples.at(-1)?.toFixed(0) ?? '-'}`).join(', ')} ms`);
    }
    const cacheLengths = byName('mod')
      .session!.layerCacheLengths()
      .map((rows) => rows[0]!);
    const capacityOf = (l: number) => cacheLengths[l]! / f.prompt;
    for (const v of variants) await v.session!.session.release();

    log('timing the original layer by layer');
    const io = variants[0]!.session!.io;
    const feeds = originalFeeds(io, prompt[0]!, 0);
    const units = await timeUnits(original, w.path('units'), feeds, f['unit-runs'], f.warmup, opts);
    const unitsLast = f['last-logits'] ? await timeUnits(byName('original-last').path, w.path('units-last'), feeds, f['unit-runs'], f.warmup, opts) : null;

    const med = (n: string) => median(byName(n).samples);
    const tOrig = med('original');
    const share = units.layers.map((t) => t / units.total);
    const caps = [...new Set(converted.map((l) => capacityOf(l).toFixed(3)))].join(', ');
    const yesNo = (ok: boolean) => (ok ? 'yes' : '**no**');
    /** MoD against its original, with all or last-position logits, each with its own unit times. */
    const speedups = (suffix: '' | '-last', u: UnitTimes) => {
      const o = med(`original${suffix}`);
      const convertedShare = converted.reduce((a, l) => a + u.layers[l]! / u.total, 0);
      const saved = converted.reduce((a, l) => a + (u.layers[l]! / u.total) * (1 - capacityOf(l)), 0);
      const ideal = o * (1 - saved);
      const achieved = o / med(`mod${suffix}`);
      return {
        logits: suffix ? 'last' : 'all',
        original: o,
        ideal,
        convertedShare,
        idealSpeedup: o / ideal,
        achieved,
        achievedOverIdeal: achieved / (o / ideal),
        suffixShare: u.suffix / u.total,
      };
    };
    const rows = unitsLast ? [speedups('', units), speedups('-last', unitsLast)] : [speedups('', units)];
    const base = (v: Variant) => byName(v.name.endsWith('-last') ? 'original-last' : 'original');
    const allPassRatio = (suffix: '' | '-last') => med(`all-pass${suffix}`) / med(`original${suffix}`);

    if (f.json) {
      console.log(
        JSON.stringify(
          {
            bench: 'prefill',
            settings: {
              ...settingsJson(f, command),
              batch: 1,
              prompt: f.prompt,
              warmup: f.warmup,
              runs: f.runs,
              order: 'interleaved run by run, rotating',
              converted,
              capacity: f.capacity,
              gcMedianMs: median(gcMs),
            },
            models: variants.map((v) => ({
              model: v.name,
              label: v.label,
              median: median(v.samples),
              min: Math.min(...v.samples),
              max: Math.max(...v.samples),
              vsOriginal: {
                of: base(v).name,
                ofMedians: median(v.samples) / median(base(v).samples),
                medianOfPaired: medianOfPaired(base(v).samples, v.samples),
              },
              samples: v.samples,
            })),
            speedup: rows,
            targets: {
              allPassOverOriginal: { value: allPassRatio(''), target: 1.05, met: allPassRatio('') <= 1.05 },
              modAchievedOverIdeal: rows.map((r) => ({ logits: r.logits, value: r.achievedOverIdeal, target: 0.9, met: r.achievedOverIdeal >= 0.9 })),
            },
            units: {
              prefix: units.prefix,
              layers: units.layers,
              suffix: units.suffix,
              total: units.total,
              capacity: converted.map((l) => ({ layer: l, capacity: capacityOf(l) })),
            },
            unitsLastLogits: unitsLast,
          },
          null,
          2,
        ),
      );
      return;
    }

    const out: string[] = [];
    out.push(`## Prefill: ${f.prompt}-token prompt, batch 1`, '');
    out.push(
      '```',
      `command: ${command}`,
      environment(f),
      modelLine(f),
      `all-pass: routers all-pass, all ${allPassCompile.plan.layers.length} layers converted, ungated (compile ${(allPassCompile.ms / 1000).toFixed(1)} s)`,
      `mod: top-k capacity ${f.capacity}, schedule every-other (layers ${converted.join(', ')}), random routers seed ${f['router-seed']}, gated (compile ${(modCompile.ms / 1000).toFixed(1)} s)`,
      ...(f['last-logits'] ? ['last-position logits: the same three models with the last-logits pass (modc compile --logits last): logits [1, 1, V]'] : []),
      `timing: ModSession.forward (feeds + session.run + logits), ${f.warmup} warm-up + ${f.runs} timed rounds; in each round every model runs once, the first model rotating; median reported`,
      f.gc
        ? `garbage collected before every run, outside the timing (median ${ms(median(gcMs), 1)} per collection)`
        : 'garbage collection left to V8 (inside the timed runs)',
      `units: original cut by analyzeDecoder -> splitFusedBoundaries -> extractDecoder, run by LayerByLayerRunner on the same prompt; ${f.warmup} warm-up + ${f['unit-runs']} timed runs, median per unit`,
      '```',
      '',
    );
    const spread = (v: Variant) => `${Math.min(...v.samples).toFixed(0)} - ${Math.max(...v.samples).toFixed(0)} ms`;
    out.push(
      table(
        ['model', 'median prefill', 'min - max', 'vs its original (ratio of medians)', 'vs its original (median of per-round ratios)', 'target', 'met'],
        [
          ...variants.map((v) => {
            const isAllPass = v.name.startsWith('all-pass');
            const r = median(v.samples) / median(base(v).samples);
            return [
              v.label,
              ms(median(v.samples)),
              spread(v),
              ratio(r),
              ratio(medianOfPaired(base(v).samples, v.samples)),
              isAllPass ? '<= 1.05x' : '',
              isAllPass ? yesNo(r <= 1.05) : '',
            ];
          }),
        ],
      ),
      '',
    );
    out.push(
      '"its original" is the original with the same logits. MoD ideal = original x (1 - sum f_l (1 - c_l)), f_l from the unit times of that original (with last-position logits the suffix runs the lm_head on one position).',
      '',
    );
    out.push(
      table(
        [
          'logits',
          'original',
          'MoD ideal',
          'suffix share (lm_head)',
          "f (converted layers' share)",
          'capacity used',
          'ideal speedup',
          'achieved speedup',
          'achieved / ideal',
          'target',
          'met',
        ],
        rows.map((r) => {
          return [
            r.logits,
            ms(r.original),
            ms(r.ideal),
            pct(r.suffixShare),
            pct(r.convertedShare),
            caps,
            ratio(r.idealSpeedup),
            ratio(r.achieved),
            r.achievedOverIdeal.toFixed(3),
            '>= 0.9',
            yesNo(r.achievedOverIdeal >= 0.9),
          ];
        }),
      ),
      '',
    );
    out.push(
      `Per-unit times of the original (median of ${f['unit-runs']}; unit sum ${ms(units.total)} vs whole model ${ms(tOrig)}${unitsLast ? `; with last-position logits ${ms(unitsLast.total)} vs ${ms(med('original-last'))}` : ''}):`,
      '',
    );
    const lastCols = (pick: (u: UnitTimes) => number) => (unitsLast ? [ms(pick(unitsLast)), pct(pick(unitsLast) / unitsLast.total)] : []);
    out.push(
      table(
        ['unit', 'median', 'share of unit sum', 'converted in MoD', 'capacity', ...(unitsLast ? ['median (last logits)', 'share (last logits)'] : [])],
        [
          ['prefix (embedding, mask, rotary)', ms(units.prefix), pct(units.prefix / units.total), '', '', ...lastCols((u) => u.prefix)],
          ...units.layers.map((t, l) => [
            `layer ${l}`,
            ms(t),
            pct(share[l]!),
            converted.includes(l) ? 'yes' : '',
            converted.includes(l) ? capacityOf(l).toFixed(3) : '',
            ...lastCols((u) => u.layers[l]!),
          ]),
          ['suffix (final norm, lm_head)', ms(units.suffix), pct(units.suffix / units.total), '', '', ...lastCols((u) => u.suffix)],
        ],
      ),
      '',
    );
    out.push('Raw timed runs (ms):', '', ...variants.map((v) => `- ${v.name}: ${v.samples.map((t) => t.toFixed(0)).join(', ')}`));
    console.log(out.join('\n'));
  } finally {
    w.dispose();
  }
}
