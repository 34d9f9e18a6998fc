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
import {
  collectGarbage,
  environment,
  flagHelp,
  log,
  mean,
  median,
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
  applyQuick,
  buildModel,
  compileModel,
  type FlagSpecs,
} from './common.js';
import { medianOfPaired, rotation } from '../compiler/apps/benchmark/benchmark.js';
import { ModSession } from '../compiler/runtime/session.js';

/** Per layer, per row: the tokens its cache holds. */
const cacheLengths = (s: ModSession) => s.layerCacheLengths();

export const DECODE_FLAGS = {
  ...modelFlags({ prompt: 2047, runs: 32, warmup: 3 }),
  runs: { kind: 'int', default: 32, help: 'timed decode steps (per-token latency: median over them)' },
  warmup: { kind: 'int', default: 3, help: 'untimed decode steps right after the prefill' },
  prompt: { kind: 'int', default: 2047, help: 'prompt tokens (context = prompt + 1 at the first step)' },
  'unit-runs': { kind: 'int', default: 9, help: 'timed runs of the layer-by-layer units on one decode step (median per unit)' },
  'all-pass': {
    kind: 'bool',
    default: true,
    help: 'also step the all-pass compile (every layer, every token, ungated) as a third model; --no-all-pass skips it',
  },
  batch: { kind: 'int', default: 1, help: 'rows (each its own seeded prompt of --prompt tokens, no padding)' },
} satisfies FlagSpecs;

export const DECODE_USAGE = `node dist/bench/run.js decode [flags]

Prefills a long prompt, then decodes token by token with forced (seeded) token ids, for the
original, the MoD compile (top-k capacity c on every other layer, gated, random routers) and the
all-pass compile, interleaved step by step: every model takes step t before any takes step t+1,
and the model that goes first rotates. Prints KV bytes and per-token latency against their
ideals: median, mean, min - max, the ratio of medians and the median of per-step ratios,
and the process's CPU time per step (less sensitive than wall time to other load).
--keep keeps the folder with original.onnx, mod.onnx and all-pass.onnx.

${flagHelp(DECODE_FLAGS)}`;

export async function decodeBench(argv: readonly string[]): Promise<void> {
  const f = applyQuick(parseFlags(argv, DECODE_FLAGS), argv, { prompt: 255, runs: 8, warmup: 2, 'unit-runs': 3 });
  const command = `npm run bench -- decode ${argv.join(' ')}`.trimEnd();
  const w = new Workdir(f.keep);
  try {
    const originalPath = buildModel(w, f);
    const modPath = w.path('mod.onnx');
    const compiled = compileModel(originalPath, modPath, {
      routers: { kind: 'random', seed: f['router-seed'] },
      mode: 'topk',
      capacity: f.capacity,
      schedule: 'every-other',
      gated: true,
    });
    const converted = compiled.plan.layers.map((l) => l.layer);
    const opts = sessionOptions(f);
    const allPassPath = w.path('all-pass.onnx');
    if (f['all-pass']) compileModel(originalPath, allPassPath, { routers: { kind: 'all-pass' }, gated: false });
    const models = [['original', originalPath], ['mod', modPath], ...(f['all-pass'] ? [['all-pass', allPassPath]] : [])] as const;
    const B = f.batch;
    const prompt = Array.from({ length: B }, (_, b) => tokenIds(f.prompt, f.vocab, 1234 + b));
    const forced = Array.from({ length: f.warmup + f.runs }, (_, t) => Array.from({ length: B }, (_, b) => tokenIds(f.warmup + f.runs, f.vocab, 99 + b)[t]!));
    const total = f.prompt + f.warmup + f.runs;

    // All models live at once: each prefills, then the steps are interleaved (step t of every
    // model, in rotating order, before step t + 1), so load drift hits all alike and every step
    // gives a paired ratio. The compiled model's cache lengths after each step tell which
    // converted layers ran (for some row).
    // cpu: the process's CPU time (user + system, every thread) per step: what a step costs, less
    // sensitive than wall time to other processes on a shared machine.
    interface Run {
      session: ModSession;
      prefillMs: number;
      kvAfterPrefill: number;
      lengthsAfterPrefill: number[][];
      lengths: number[][];
      steps: number[];
      cpu: number[];
      ran: Map<number, number>;
    }
    const runs = new Map<string, Run>();
    for (const [name, path] of models) {
      const session = await ModSession.create(path, opts);
      if (f.gc) collectGarbage();
      const t0 = performance.now();
      await session.forward(prompt);
      const prefillMs = performance.now() - t0;
      const lengths = cacheLengths(session);
      runs.set(name, {
        session,
        prefillMs,
        kvAfterPrefill: session.kvBytes(),
        lengthsAfterPrefill: lengths,
        lengths,
        steps: [],
        cpu: [],
        ran: new Map(converted.map((l) => [l, 0])),
      });
      log(`prefill ${name}: ${prefillMs.toFixed(0)} ms`);
    }
    const order = [...runs.values()];
    const gcMs: number[] = [];
    for (let t = 0; t < f.warmup + f.runs; t++) {
      for (const m of rotation(order.length, t)) {
        const run = order[m]!;
        if (f.gc) gcMs.push(collectGarbage());
        const c0 = process.cpuUsage();
        const t0 = performance.now();
        await run.session.step(forced[t]!);
        const took = performance.now() - t0;
        const c1 = process.cpuUsage(c0);
        const now = cacheLengths(run.session);
        if (t >= f.warmup) {
          run.steps.push(took);
          run.cpu.push((c1.user + c1.system) / 1000);
          for (const l of converted) if (now[l]!.some((n, b) => n > run.lengths[l]![b]!)) run.ran.set(l, run.ran.get(l)! + 1);
        }
        run.lengths = now;
      }
      if (t === f.warmup - 1 || (t + 1) % 8 === 0 || t === f.warmup + f.runs - 1)
        log(`step ${t + 1}/${f.warmup + f.runs}: ${[...runs].map(([n, r]) => `${n} ${r.steps.at(-1)?.toFixed(1) ?? '-'} ms`).join(', ')}`);
    }
    const kvAtEnd = new Map([...runs].map(([n, r]) => [n, r.session.kvBytes()]));
    for (const r of runs.values()) await r.session.session.release();
    const original = runs.get('original')!;
    const mod = runs.get('mod')!;
    const allPass = runs.get('all-pass');
    const io = original.session.io;
    const kvBytesPerToken = io.kv.map((b) => 2 * b.numHeads * b.headSize * (b.dtype === 'float16' ? 2 : 4));

    log('timing one decode step of the original layer by layer');
    const units = await timeUnits(originalPath, w.path('units'), originalFeeds(io, [forced[0]![0]!], f.prompt, B), f['unit-runs'], 2, opts);

    const exactIdeal = (lens: number[][]) => lens.reduce((a, rows, l) => a + rows.reduce((x, n) => x + n, 0) * kvBytesPerToken[l]!, 0);
    const measuredCapacity = (lens: number[][], T: number) => mean(converted.map((l) => mean(lens[l]!) / T));
    const formulaIdeal = (orig: number, lens: number[][], T: number) => orig * (1 - (converted.length / f.layers) * (1 - measuredCapacity(lens, T)));
    const kvAfter = {
      prefill: { original: original.kvAfterPrefill, mod: mod.kvAfterPrefill, lengths: mod.lengthsAfterPrefill, tokens: f.prompt },
      end: { original: kvAtEnd.get('original')!, mod: kvAtEnd.get('mod')!, lengths: mod.lengths, tokens: total },
    };
    const kvRow = (label: string, k: typeof kvAfter.prefill) => [
      label,
      mib(k.original),
      mib(k.mod),
      ratio(k.mod / k.original),
      mib(exactIdeal(k.lengths)),
      ratio(k.mod / exactIdeal(k.lengths)),
      `${mib(formulaIdeal(k.original, k.lengths, k.tokens))} (c = ${measuredCapacity(k.lengths, k.tokens).toFixed(3)})`,
    ];

    const share = units.layers.map((t) => t / units.total);
    const skip = (l: number) => 1 - mod.ran.get(l)! / f.runs;
    const saved = converted.reduce((a, l) => a + share[l]! * skip(l), 0);
    const d = converted.reduce((a, l) => a + share[l]!, 0);
    const [oMed, mMed, oMean, mMean] = [median(original.steps), median(mod.steps), mean(original.steps), mean(mod.steps)];
    const idealMed = oMed * (1 - saved);
    const idealMean = oMean * (1 - saved);
    const meanSkip = mean(converted.map(skip));
    const spread = (xs: number[]) => `${Math.min(...xs).toFixed(1)} - ${Math.max(...xs).toFixed(1)} ms`;
    const paired = (r: Run) => medianOfPaired(original.steps, r.steps);
    const yesNo = (ok: boolean) => (ok ? 'yes' : '**no**');
    const allPassRatio = allPass ? median(allPass.steps) / oMed : NaN;
    const achievedOverIdeal = (oMed / mMed) * (1 - saved);

    if (f.json) {
      const stats = (name: string, r: Run) => ({
        model: name,
        prefillMs: r.prefillMs,
        median: median(r.steps),
        mean: mean(r.steps),
        min: Math.min(...r.steps),
        max: Math.max(...r.steps),
        vsOriginal: { ofMedians: median(r.steps) / oMed, medianOfPaired: paired(r) },
        cpuMs: { median: median(r.cpu), vsOriginal: { ofMedians: median(r.cpu) / median(original.cpu), medianOfPaired: medianOfPaired(original.cpu, r.cpu) } },
        kvBytesAtEnd: kvAtEnd.get(name)!,
        steps: r.steps,
        cpuSteps: r.cpu,
      });
      console.log(
        JSON.stringify(
          {
            bench: 'decode',
            settings: {
              ...settingsJson(f, command),
              batch: B,
              prompt: f.prompt,
              warmupSteps: f.warmup,
              timedSteps: f.runs,
              order: 'interleaved step by step, rotating',
              converted,
              capacity: f.capacity,
              gcMedianMs: median(gcMs),
            },
            kv: {
              afterPrefill: { original: kvAfter.prefill.original, mod: kvAfter.prefill.mod, exactIdeal: exactIdeal(kvAfter.prefill.lengths) },
              atEnd: { original: kvAfter.end.original, mod: kvAfter.end.mod, exactIdeal: exactIdeal(kvAfter.end.lengths) },
            },
            latency: [...runs].map(([n, r]) => stats(n, r)),
            ideal: { median: idealMed, mean: idealMean, d, meanSkip, idealSpeedup: 1 / (1 - saved), achievedOverIdeal },
            targets: {
              allPassOverOriginal: { value: allPassRatio, target: 1.05, met: allPassRatio <= 1.05 },
              modAchievedOverIdeal: { value: achievedOverIdeal, target: 0.95, met: achievedOverIdeal >= 0.95 },
            },
            units: { prefix: units.prefix, layers: units.layers, suffix: units.suffix, total: units.total },
            layers: units.layers.map((_, l) => ({
              layer: l,
              converted: converted.includes(l),
              stepsRun: converted.includes(l) ? mod.ran.get(l) : null,
              cacheTokensAtEnd: mod.lengths[l],
            })),
          },
          null,
          2,
        ),
      );
      return;
    }

    const out: string[] = [];
    out.push(`## Decode: ${f.prompt}-token prompt, then ${f.warmup} + ${f.runs} decode steps, batch ${B}`, '');
    out.push(
      '```',
      `command: ${command}`,
      environment(f),
      modelLine(f),
      `mod: top-k capacity ${f.capacity} on the prompt, r >= 0.5 per decode step; schedule every-other (layers ${converted.join(', ')}), random routers seed ${f['router-seed']}, gated (compile ${(compiled.ms / 1000).toFixed(1)} s)`,
      ...(allPass ? [`all-pass: routers all-pass, all ${f.layers} layers converted, ungated`] : []),
      `timing: ModSession.step (feeds + session.run + logits) with forced seeded token ids; all models prefilled, then interleaved step by step (step t of every model, first model rotating, before step t + 1): ${f.warmup} untimed steps, then ${f.runs} timed; context ${f.prompt + 1} at the first step, ${total} after the last`,
      f.gc
        ? `garbage collected before every step, outside the timing (median ${ms(median(gcMs), 1)} per collection)`
        : 'garbage collection left to V8 (inside the timed steps)',
      `prefill (one run each, includes first-run setup): ${[...runs].map(([n, r]) => `${n} ${ms(r.prefillMs, 0)}`).join(', ')}`,
      `units: one decode step of the original at past length ${f.prompt} (zero K/V), batch ${B}, cut by analyzeDecoder -> splitFusedBoundaries -> extractDecoder and run by LayerByLayerRunner; 2 warm-up + ${f['unit-runs']} timed runs, median per unit`,
      '```',
      '',
    );
    out.push(
      'KV cache (ModSession.kvBytes: bytes of every cache tensor, batch padding included; exact ideal: sum over layers and rows of cached tokens x bytes per token):',
      '',
    );
    out.push(
      table(
        ['after', 'original', 'MoD', 'MoD / original', 'ideal (exact)', 'MoD / ideal', 'ideal (formula)'],
        [kvRow(`prefill (${f.prompt} tokens)`, kvAfter.prefill), kvRow(`prefill + ${f.warmup + f.runs} steps (${total} tokens)`, kvAfter.end)],
      ),
      '',
    );
    out.push(`Per-token decode latency (${f.runs} timed steps per model, interleaved; ideal = original x (1 - sum over converted l of d_l x skip_l)):`, '');
    out.push(
      table(
        [
          'model',
          'median per token',
          'mean per token',
          'min - max',
          'vs original (ratio of medians)',
          'vs original (median of per-step ratios)',
          'target',
          'met',
        ],
        [
          ['original', ms(oMed, 2), ms(oMean, 2), spread(original.steps), ratio(1), ratio(1), '', ''],
          [
            `MoD c=${f.capacity}, every other layer (${converted.length}/${f.layers})`,
            ms(mMed, 2),
            ms(mMean, 2),
            spread(mod.steps),
            ratio(mMed / oMed),
            ratio(paired(mod)),
            '',
            '',
          ],
          ['MoD ideal', ms(idealMed, 2), ms(idealMean, 2), '', ratio(idealMed / oMed), '', '', ''],
          ...(allPass
            ? [
                [
                  `all-pass (${f.layers}/${f.layers} layers, ungated; KV ${mib(kvAtEnd.get('all-pass')!)} at the end)`,
                  ms(median(allPass.steps), 2),
                  ms(mean(allPass.steps), 2),
                  spread(allPass.steps),
                  ratio(allPassRatio),
                  ratio(paired(allPass)),
                  '<= 1.05x',
                  yesNo(allPassRatio <= 1.05),
                ],
              ]
            : []),
        ],
      ),
      '',
    );
    const oCpu = median(original.cpu);
    out.push(`CPU time per step (process user + system, all threads; less sensitive than wall time to other load on the machine):`, '');
    out.push(
      table(
        ['model', 'median CPU per token', 'min - max', 'vs original (ratio of medians)', 'vs original (median of per-step ratios)'],
        [...runs].map(([n, r]) => [n, ms(median(r.cpu), 2), spread(r.cpu), ratio(median(r.cpu) / oCpu), ratio(medianOfPaired(original.cpu, r.cpu))]),
      ),
      '',
    );
    out.push(
      table(
        [
          "d (converted layers' share of a step)",
          'mean skip rate of converted layers',
          'ideal speedup',
          'achieved (median)',
          'achieved / ideal (median)',
          'target',
          'met',
          'achieved (mean)',
          'achieved / ideal (mean)',
        ],
        [
          [
            pct(d),
            pct(meanSkip),
            ratio(1 / (1 - saved)),
            ratio(oMed / mMed),
            achievedOverIdeal.toFixed(3),
            '>= 0.95',
            yesNo(achievedOverIdeal >= 0.95),
            ratio(oMean / mMean),
            ((oMean / mMean) * (1 - saved)).toFixed(3),
          ],
        ],
      ),
      '',
    );
    out.push(
      `Per layer (decode-step unit times of the original, median of ${f['unit-runs']}; unit sum ${ms(units.total, 2)} vs whole-model step ${ms(oMed, 2)}):`,
      '',
    );
    out.push(
      table(
        ['unit', 'decode-step time', 'share d_l', 'converted', 'prompt capacity', 'steps run', 'cache tokens at end (per row)'],
        [
          ['prefix', ms(units.prefix, 2), pct(units.prefix / units.total), '', '', '', ''],
          ...units.layers.map((t, l) => {
            const c = converted.includes(l);
            return [
              `layer ${l}`,
              ms(t, 2),
              pct(share[l]!),
              c ? 'yes' : '',
              c ? (mean(mod.lengthsAfterPrefill[l]!) / f.prompt).toFixed(3) : '',
              c ? `${mod.ran.get(l)}/${f.runs}` : '',
              mod.lengths[l]!.join(' '),
            ];
          }),
          ['suffix', ms(units.suffix, 2), pct(units.suffix / units.total), '', '', '', ''],
        ],
      ),
      '',
    );
    out.push('Raw timed steps (ms):', '', ...[...runs].map(([n, r]) => `- ${n}: ${r.steps.map((t) => t.toFixed(1)).join(', ')}`));
    console.log(out.join('\n'));
  } finally {
    w.dispose();
  }
}
