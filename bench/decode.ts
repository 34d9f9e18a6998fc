/**
 * Decode benchmark ("KV-cache compaction"): a long prompt, then token-by-token decoding, for the
 * original builder model and its MoD compile (top-k capacity c on every other layer, gated,
 * random routers; a one-token step selects the token iff r >= 0.5, SPEC.md). Reports the KV
 * bytes the caches hold (ModSession.kvBytes) against the ideal, and the per-token latency
 * against the ideal latency.
 *
 *   KV ideal (exact)   = sum over layers l of (tokens in l's cache) x 2 x kv_heads x head_size x 4 B
 *   KV ideal (formula) = original x (1 - (converted / layers) x (1 - measured capacity))
 *   d_l                = t(layer unit l) / t(all units) for one decode step of the original at the
 *                        same context (prefix, layers and suffix timed one by one)
 *   skip_l             = share of the timed steps in which converted layer l did not select the token
 *   latency ideal      = original x (1 - sum over converted l of d_l x skip_l)
 */
import { collectGarbage, environment, flagHelp, log, mean, median, mib, modelFlags, modelLine, ms, originalFeeds, parseFlags, pct, ratio, sessionOptions, table, timeUnits, tokenIds, Workdir, applyQuick, buildModel, compileModel, type FlagSpecs } from './common.js';
import type { DecoderIo } from '../compiler/runtime/decoder-io.js';
import { ModSession } from '../compiler/runtime/session.js';

/** Per layer: the tokens its cache holds (batch 1). */
const cacheLengths = (s: ModSession) => s.layerCacheLengths().map((rows) => rows[0]!);

export const DECODE_FLAGS = {
  ...modelFlags({ prompt: 2047, runs: 32, warmup: 3 }),
  runs: { kind: 'int', default: 32, help: 'timed decode steps (per-token latency: median over them)' },
  warmup: { kind: 'int', default: 3, help: 'untimed decode steps right after the prefill' },
  prompt: { kind: 'int', default: 2047, help: 'prompt tokens (context = prompt + 1 at the first step)' },
  'unit-runs': { kind: 'int', default: 9, help: 'timed runs of the layer-by-layer units on one decode step (median per unit)' },
  'all-pass': { kind: 'bool', default: true, help: 'also step the all-pass compile (every layer, every token, ungated) as a third model; --no-all-pass skips it' },
} satisfies FlagSpecs;

export const DECODE_USAGE = `node dist/bench/run.js decode [flags]

Prefills a long prompt (batch 1, CPU execution provider), then decodes token by token with forced
(seeded) token ids, for the original and the MoD compile (top-k capacity c on every other layer,
gated, random routers). Prints KV bytes and per-token latency against their ideals.

${flagHelp(DECODE_FLAGS)}`;

export async function decodeBench(argv: readonly string[]): Promise<void> {
  const f = applyQuick(parseFlags(argv, DECODE_FLAGS), argv, { prompt: 255, runs: 8, warmup: 2, 'unit-runs': 3 });
  const w = new Workdir(f.keep);
  try {
    const originalPath = buildModel(w, f);
    const modPath = w.path('mod.onnx');
    const compiled = compileModel(originalPath, modPath, {
      routers: { kind: 'random', seed: f['router-seed'] }, mode: 'topk', capacity: f.capacity, schedule: 'every-other', gated: true,
    });
    const converted = compiled.plan.layers.map((l) => l.layer);
    const opts = sessionOptions(f);
    const allPassPath = w.path('all-pass.onnx');
    if (f['all-pass']) compileModel(originalPath, allPassPath, { routers: { kind: 'all-pass' }, gated: false });
    const models = [['original', originalPath], ['mod', modPath], ...(f['all-pass'] ? [['all-pass', allPassPath]] : [])] as const;
    const prompt = [tokenIds(f.prompt, f.vocab, 1234)];
    const forced = tokenIds(f.warmup + f.runs, f.vocab, 99);
    const total = f.prompt + f.warmup + f.runs;

    // One model at a time: a prefill, untimed steps, timed steps. (Stepping several sessions
    // alternately was tried: their large, differently sized KV tensors defeat the allocator's
    // reuse and the page faults add noise to every model's steps.) The compiled model's cache
    // lengths after each step tell which converted layers ran.
    interface Run { prefillMs: number; kvAfterPrefill: number; lengthsAfterPrefill: number[]; steps: number[]; kvAtEnd: number; lengthsAtEnd: number[]; ran: Map<number, number> }
    const runs = new Map<string, Run>();
    const gcMs: number[] = [];
    let io: DecoderIo | undefined;
    for (const [name, path] of models) {
      const s = await ModSession.create(path, opts);
      io ??= s.io;
      let t0 = performance.now();
      await s.forward(prompt);
      const run: Run = { prefillMs: performance.now() - t0, kvAfterPrefill: s.kvBytes(), lengthsAfterPrefill: cacheLengths(s), steps: [], kvAtEnd: 0, lengthsAtEnd: [], ran: new Map(converted.map((l) => [l, 0])) };
      log(`prefill ${name}: ${run.prefillMs.toFixed(0)} ms`);
      let lengths = run.lengthsAfterPrefill;
      for (let t = 0; t < f.warmup + f.runs; t++) {
        if (f.gc) gcMs.push(collectGarbage());
        t0 = performance.now();
        await s.step([forced[t]!]);
        const took = performance.now() - t0;
        const now = cacheLengths(s);
        if (t >= f.warmup) {
          run.steps.push(took);
          for (const l of converted) if (now[l]! > lengths[l]!) run.ran.set(l, run.ran.get(l)! + 1);
        }
        lengths = now;
      }
      log(`${name} steps (ms): ${run.steps.map((t) => t.toFixed(0)).join(' ')}`);
      run.kvAtEnd = s.kvBytes();
      run.lengthsAtEnd = lengths;
      runs.set(name, run);
      await s.session.release();
    }
    const original = runs.get('original')!;
    const mod = runs.get('mod')!;
    const allPass = runs.get('all-pass');
    const kvBytesPerToken = io!.kv.map((b) => 2 * b.numHeads * b.headSize * (b.dtype === 'float16' ? 2 : 4));

    log('timing one decode step of the original layer by layer');
    const units = await timeUnits(originalPath, w.path('units'), originalFeeds(io!, [forced[0]!], f.prompt), f['unit-runs'], 2, opts);

    const exactIdeal = (lens: number[]) => lens.reduce((a, n, l) => a + n * kvBytesPerToken[l]!, 0);
    const measuredCapacity = (lens: number[], T: number) => mean(converted.map((l) => lens[l]! / T));
    const formulaIdeal = (orig: number, lens: number[], T: number) => orig * (1 - (converted.length / f.layers) * (1 - measuredCapacity(lens, T)));
    const kvRow = (label: string, orig: number, got: number, lens: number[], T: number) =>
      [label, mib(orig), mib(got), ratio(got / orig), mib(exactIdeal(lens)), ratio(got / exactIdeal(lens)), `${mib(formulaIdeal(orig, lens, T))} (c = ${measuredCapacity(lens, T).toFixed(3)})`];

    const share = units.layers.map((t) => t / units.total);
    const skip = (l: number) => 1 - mod.ran.get(l)! / f.runs;
    const saved = converted.reduce((a, l) => a + share[l]! * skip(l), 0);
    const d = converted.reduce((a, l) => a + share[l]!, 0);
    const [oMed, mMed, oMean, mMean] = [median(original.steps), median(mod.steps), mean(original.steps), mean(mod.steps)];
    const idealMed = oMed * (1 - saved);
    const idealMean = oMean * (1 - saved);
    const meanSkip = mean(converted.map(skip));
    const spread = (xs: number[]) => `${Math.min(...xs).toFixed(1)} - ${Math.max(...xs).toFixed(1)} ms`;

    const out: string[] = [];
    out.push(`## Decode: ${f.prompt}-token prompt, then ${f.warmup} + ${f.runs} decode steps, batch 1`, '');
    out.push('```', `command: npm run bench -- decode ${argv.join(' ')}`.trimEnd(), environment(f), modelLine(f),
      `mod: top-k capacity ${f.capacity} on the prompt, r >= 0.5 per decode step; schedule every-other (layers ${converted.join(', ')}), random routers seed ${f['router-seed']}, gated (compile ${(compiled.ms / 1000).toFixed(1)} s)`,
      ...(allPass ? [`all-pass: routers all-pass, all ${f.layers} layers converted, ungated`] : []),
      `timing: ModSession.step (feeds + session.run + logits) with forced seeded token ids, one model at a time; per model a prefill, ${f.warmup} untimed steps, then ${f.runs} timed; context ${f.prompt + 1} at the first step, ${total} after the last`,
      f.gc ? `garbage collected before every step, outside the timing (median ${ms(median(gcMs), 1)} per collection)` : 'garbage collection left to V8 (inside the timed steps)',
      `prefill (one run each, includes first-run setup): ${[...runs].map(([n, r]) => `${n} ${ms(r.prefillMs, 0)}`).join(', ')}`,
      `units: one decode step of the original at past length ${f.prompt} (zero K/V), cut by analyzeDecoder -> splitFusedBoundaries -> extractDecoder and run by LayerByLayerRunner; 2 warm-up + ${f['unit-runs']} timed runs, median per unit`,
      '```', '');
    out.push('KV cache (ModSession.kvBytes: bytes of every cache tensor; exact ideal: sum over layers of cached tokens x bytes per token):', '');
    out.push(table(['after', 'original', 'MoD', 'MoD / original', 'ideal (exact)', 'MoD / ideal', 'ideal (formula)'], [
      kvRow(`prefill (${f.prompt} tokens)`, original.kvAfterPrefill, mod.kvAfterPrefill, mod.lengthsAfterPrefill, f.prompt),
      kvRow(`prefill + ${f.warmup + f.runs} steps (${total} tokens)`, original.kvAtEnd, mod.kvAtEnd, mod.lengthsAtEnd, total),
    ]), '');
    out.push(`Per-token decode latency (${f.runs} timed steps; ideal = original x (1 - sum over converted l of d_l x skip_l)):`, '');
    out.push(table(['model', 'median per token', 'mean per token', 'min - max', 'vs original (median)'], [
      ['original', ms(oMed, 2), ms(oMean, 2), spread(original.steps), ratio(1)],
      [`MoD c=${f.capacity}, every other layer (${converted.length}/${f.layers})`, ms(mMed, 2), ms(mMean, 2), spread(mod.steps), ratio(mMed / oMed)],
      ['MoD ideal', ms(idealMed, 2), ms(idealMean, 2), '', ratio(idealMed / oMed)],
      ...(allPass ? [[`all-pass (${f.layers}/${f.layers} layers, ungated; KV ${mib(allPass.kvAtEnd)} at the end)`, ms(median(allPass.steps), 2), ms(mean(allPass.steps), 2), spread(allPass.steps), ratio(median(allPass.steps) / oMed)]] : []),
    ]), '');
    out.push(table(['d (converted layers\' share of a step)', 'mean skip rate of converted layers', 'ideal speedup', 'achieved (median)', 'achieved / ideal (median)', 'achieved (mean)', 'achieved / ideal (mean)'], [
      [pct(d), pct(meanSkip), ratio(1 / (1 - saved)), ratio(oMed / mMed), ((oMed / mMed) * (1 - saved)).toFixed(3), ratio(oMean / mMean), ((oMean / mMean) * (1 - saved)).toFixed(3)],
    ]), '');
    out.push(`Per layer (decode-step unit times of the original, median of ${f['unit-runs']}; unit sum ${ms(units.total, 2)} vs whole-model step ${ms(oMed, 2)}):`, '');
    out.push(table(['unit', 'decode-step time', 'share d_l', 'converted', 'prompt capacity', 'steps run', 'cache tokens at end'], [
      ['prefix', ms(units.prefix, 2), pct(units.prefix / units.total), '', '', '', ''],
      ...units.layers.map((t, l) => {
        const c = converted.includes(l);
        return [`layer ${l}`, ms(t, 2), pct(share[l]!), c ? 'yes' : '', c ? (mod.lengthsAfterPrefill[l]! / f.prompt).toFixed(3) : '', c ? `${mod.ran.get(l)}/${f.runs}` : '', mod.lengthsAtEnd[l]!];
      }),
      ['suffix', ms(units.suffix, 2), pct(units.suffix / units.total), '', '', '', ''],
    ]), '');
    out.push('Raw timed steps (ms):', '', ...[...runs].map(([n, r]) => `- ${n}: ${r.steps.map((t) => t.toFixed(1)).join(', ')}`));
    console.log(out.join('\n'));
  } finally {
    w.dispose();
  }
}
