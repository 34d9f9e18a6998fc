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
 */
import { collectGarbage, environment, flagHelp, log, median, modelFlags, modelLine, ms, originalFeeds, parseFlags, pct, ratio, sessionOptions, table, timeUnits, tokenIds, Workdir, applyQuick, buildModel, compileModel, type FlagSpecs } from './common.js';
import { ModSession } from '../compiler/runtime/session.js';

export const PREFILL_FLAGS = {
  ...modelFlags({ prompt: 1024, runs: 5, warmup: 2 }),
  'unit-runs': { kind: 'int', default: 5, help: 'timed runs of the layer-by-layer units (median per unit)' },
} satisfies FlagSpecs;

export const PREFILL_USAGE = `node dist/bench/run.js prefill [flags]

Times a batch-1 prefill on the CPU execution provider: original, all-pass compile (every
layer, ungated) and MoD compile (top-k capacity c on every other layer, gated, random routers),
and derives the ideal MoD time from the original's per-layer unit times.

${flagHelp(PREFILL_FLAGS)}`;

interface Variant {
  name: string;
  path: string;
  session?: ModSession;
  samples: number[];
}

export async function prefillBench(argv: readonly string[]): Promise<void> {
  const f = applyQuick(parseFlags(argv, PREFILL_FLAGS), argv, { 'unit-runs': 2 });
  const w = new Workdir(f.keep);
  try {
    const original = buildModel(w, f);
    const allPass = w.path('all-pass.onnx');
    const allPassCompile = compileModel(original, allPass, { routers: { kind: 'all-pass' }, gated: false });
    const mod = w.path('mod.onnx');
    const modCompile = compileModel(original, mod, {
      routers: { kind: 'random', seed: f['router-seed'] }, mode: 'topk', capacity: f.capacity, schedule: 'every-other', gated: true,
    });
    const converted = modCompile.plan.layers.map((l) => l.layer);

    const opts = sessionOptions(f);
    const variants: Variant[] = [
      { name: 'original', path: original, samples: [] },
      { name: 'all-pass', path: allPass, samples: [] },
      { name: 'mod', path: mod, samples: [] },
    ];
    for (const v of variants) v.session = await ModSession.create(v.path, opts);
    const prompt = [tokenIds(f.prompt, f.vocab, 1234)];
    const gcMs: number[] = [];
    // Warm-up, then timed runs interleaved across the models so that drift hits all alike.
    for (let r = 0; r < f.warmup + f.runs; r++) {
      for (const v of variants) {
        if (f.gc) gcMs.push(collectGarbage());
        const t0 = performance.now();
        await v.session!.forward(prompt);
        const t = performance.now() - t0;
        if (r >= f.warmup) v.samples.push(t);
        log(`${r < f.warmup ? 'warm-up' : 'run'} ${r + 1}: ${v.name} ${t.toFixed(0)} ms`);
      }
    }
    const modSession = variants[2]!.session!;
    const cacheLengths = modSession.layerCacheLengths().map((rows) => rows[0]!);
    const capacityOf = (l: number) => cacheLengths[l]! / f.prompt;
    for (const v of variants) await v.session!.session.release();

    log('timing the original layer by layer');
    const io = variants[0]!.session!.io;
    const units = await timeUnits(original, w.path('units'), originalFeeds(io, prompt[0]!, 0), f['unit-runs'], f.warmup, opts);

    const [tOrig, tAll, tMod] = variants.map((v) => median(v.samples)) as [number, number, number];
    const share = units.layers.map((t) => t / units.total);
    const f_conv = converted.reduce((a, l) => a + share[l]!, 0);
    const saved = converted.reduce((a, l) => a + share[l]! * (1 - capacityOf(l)), 0);
    const ideal = tOrig * (1 - saved);
    const idealSpeedup = tOrig / ideal;
    const achieved = tOrig / tMod;
    const caps = [...new Set(converted.map((l) => capacityOf(l).toFixed(3)))].join(', ');
    const yesNo = (ok: boolean) => (ok ? 'yes' : '**no**');

    const out: string[] = [];
    out.push(`## Prefill: ${f.prompt}-token prompt, batch 1`, '');
    out.push('```', `command: npm run bench -- prefill ${argv.join(' ')}`.trimEnd(), environment(f), modelLine(f),
      `all-pass: routers all-pass, all ${allPassCompile.plan.layers.length} layers converted, ungated (compile ${(allPassCompile.ms / 1000).toFixed(1)} s)`,
      `mod: top-k capacity ${f.capacity}, schedule every-other (layers ${converted.join(', ')}), random routers seed ${f['router-seed']}, gated (compile ${(modCompile.ms / 1000).toFixed(1)} s)`,
      `timing: ModSession.forward (feeds + session.run + logits), ${f.warmup} warm-up + ${f.runs} timed runs per model, interleaved; median reported`,
      f.gc ? `garbage collected before every run, outside the timing (median ${ms(median(gcMs), 1)} per collection)` : 'garbage collection left to V8 (inside the timed runs)',
      `units: original cut by analyzeDecoder -> splitFusedBoundaries -> extractDecoder, run by LayerByLayerRunner on the same prompt; ${f.warmup} warm-up + ${f['unit-runs']} timed runs, median per unit`,
      '```', '');
    const spread = (v: Variant) => `${Math.min(...v.samples).toFixed(0)} - ${Math.max(...v.samples).toFixed(0)} ms`;
    // Runs are interleaved, so run r of every model saw the same machine state: the median of
    // the per-run ratios is less sensitive to drift than the ratio of the medians.
    const paired = (v: Variant) => ratio(median(v.samples.map((t, r) => t / variants[0]!.samples[r]!)));
    out.push(table(['model', 'median prefill', 'min - max', 'vs original (ratio of medians)', 'vs original (median of per-run ratios)', 'target', 'met'], [
      ['original', ms(tOrig), spread(variants[0]!), ratio(1), ratio(1), '', ''],
      [`all-pass (${allPassCompile.plan.layers.length}/${f.layers} layers, ungated)`, ms(tAll), spread(variants[1]!), ratio(tAll / tOrig), paired(variants[1]!), '<= 1.05x', yesNo(tAll / tOrig <= 1.05)],
      [`MoD c=${f.capacity}, every other layer (${converted.length}/${f.layers}, gated)`, ms(tMod), spread(variants[2]!), ratio(tMod / tOrig), paired(variants[2]!), '', ''],
      ['MoD ideal: original x (1 - sum f_l (1 - c_l))', ms(ideal), '', ratio(ideal / tOrig), '', '', ''],
    ]), '');
    out.push(table(['f (converted layers\' share)', 'capacity used', 'ideal speedup', 'achieved speedup', 'achieved / ideal', 'target', 'met'], [
      [pct(f_conv), caps, ratio(idealSpeedup), ratio(achieved), (achieved / idealSpeedup).toFixed(3), '>= 0.9', yesNo(achieved / idealSpeedup >= 0.9)],
    ]), '');
    out.push(`Per-unit times of the original (median of ${f['unit-runs']}; unit sum ${ms(units.total)} vs whole model ${ms(tOrig)}):`, '');
    out.push(table(['unit', 'median', 'share of unit sum', 'converted in MoD', 'capacity'], [
      ['prefix (embedding, mask, rotary)', ms(units.prefix), pct(units.prefix / units.total), '', ''],
      ...units.layers.map((t, l) => [`layer ${l}`, ms(t), pct(share[l]!), converted.includes(l) ? 'yes' : '', converted.includes(l) ? capacityOf(l).toFixed(3) : '']),
      ['suffix (final norm, lm_head)', ms(units.suffix), pct(units.suffix / units.total), '', ''],
    ]), '');
    out.push('Raw timed runs (ms):', '', ...variants.map((v) => `- ${v.name}: ${v.samples.map((t) => t.toFixed(0)).join(', ')}`));
    console.log(out.join('\n'));
  } finally {
    w.dispose();
  }
}
