/**
 * Long context: where MoD's memory and latency gains should show. A small
 * builder Llama model at long contexts (default 8K and 32K tokens), the original against MoD
 * compiles whose KV cache holds about half the tokens: every layer at capacity 0.5, attention-only
 * routing at 0.5 (the MLP runs on every token), and p-MoD's PRD schedule (mean retention 0.5).
 *
 * Each model runs in a fresh process per context and round (bench/long-context-probe.ts): the
 * prompt in chunks (forward, then extend), then decode steps. Reported per model: prefill time,
 * per-token decode latency (median of the steps), KV bytes (ModSession.kvBytes) and the peak
 * resident memory of its process. Rounds rotate the order of the models, and ratios are given as
 * the ratio of medians and the median of per-round ratios.
 */
import { spawnSync } from 'node:child_process';
import { medianOfPaired, rotation } from '../compiler/apps/benchmark/benchmark.js';
import { UsageError } from '../compiler/core/errors.js';
import {
  applyQuick,
  buildModel,
  compileModel,
  environment,
  flagHelp,
  log,
  median,
  mib,
  modelFlags,
  modelLine,
  ms,
  parseFlags,
  ratio,
  settingsJson,
  table,
  Workdir,
  type FlagSpecs,
  type PlanChoice,
} from './common.js';

export const LONG_CONTEXT_FLAGS = {
  ...modelFlags({ prompt: 0, runs: 1, warmup: 0 }),
  hidden: { kind: 'int', default: 256, help: 'hidden size' },
  heads: { kind: 'int', default: 4, help: 'attention heads' },
  'kv-heads': { kind: 'int', default: 4, help: 'key/value heads' },
  intermediate: { kind: 'int', default: 704, help: 'MLP intermediate size' },
  vocab: { kind: 'int', default: 8192, help: 'vocabulary size' },
  'max-positions': { kind: 'int', default: 32768, help: 'builder maxPositions' },
  contexts: { kind: 'string', default: '8192,32768', help: 'prompt lengths, comma-separated' },
  chunk: { kind: 'int', default: 2048, help: 'prompt tokens per call (forward, then extend)' },
  steps: { kind: 'int', default: 16, help: 'decode steps after the prompt (latency: their median)' },
  runs: { kind: 'int', default: 1, help: 'rounds (each model once per round, order rotating; one process each)' },
} satisfies FlagSpecs;

export const LONG_CONTEXT_USAGE = `node dist/bench/run.js long-context [flags]

A small builder Llama model at long contexts: original vs MoD compiles whose caches hold about
half the tokens (every layer at capacity 0.5; attention-only routing at 0.5; PRD). Per model and
context, in a fresh process: chunked prefill time, per-token decode latency, KV bytes, peak RSS.

${flagHelp(LONG_CONTEXT_FLAGS)}`;

interface Probe {
  prefillMs: number;
  stepMs: number[];
  kvAfterPrefill: number;
  kvBytes: number;
  cacheLengths: number[];
  peakRssBytes: number;
  rssAtStartBytes: number;
}

const VARIANTS: { name: string; label: string; choice: PlanChoice | null }[] = [
  { name: 'original', label: 'original', choice: null },
  { name: 'every-layer', label: 'MoD: every layer, top-k c = 0.5', choice: { routers: { kind: 'random', seed: 1 }, mode: 'topk', capacity: 0.5, gated: true } },
  {
    name: 'attention-only',
    label: 'MoD: attention sub-layers only, top-k c = 0.5',
    choice: { routers: { kind: 'random', seed: 1 }, mode: 'topk', capacity: 0.5, gated: true, granularity: 'attention' },
  },
  {
    name: 'prd',
    label: 'MoD: PRD schedule, mean retention 0.5',
    choice: { routers: { kind: 'random', seed: 1 }, mode: 'topk', capacity: 0.5, schedule: 'prd', gated: true },
  },
];

function probe(path: string, context: number, f: { chunk: number; steps: number; threads: number; vocab: number }): Probe {
  const script = new URL('./long-context-probe.js', import.meta.url).pathname;
  const child = spawnSync(process.execPath, [script, path, String(context), String(f.chunk), String(f.steps), String(f.threads), String(f.vocab)], {
    encoding: 'utf8',
    maxBuffer: 1 << 24,
  });
  const line = child.stdout.trim().split('\n').at(-1) ?? '';
  if (child.status !== 0 || !line.startsWith('{'))
    throw new UsageError(
      `long-context probe failed on ${path} at ${context} tokens: ${
        child.stderr
          .trim()
          .split('\n')
          .find((l) => /Error|modc/.test(l)) ??
        child.stderr.trim().split('\n')[0] ??
        line
      }`,
    );
  return JSON.parse(line) as Probe;
}

export async function longContextBench(argv: readonly string[]): Promise<void> {
  const f = applyQuick(parseFlags(argv, LONG_CONTEXT_FLAGS), argv, { layers: 4, hidden: 128, heads: 2, 'kv-heads': 2, intermediate: 352, vocab: 1024 });
  const contexts = (f.quick && !argv.some((a) => a.startsWith('--contexts')) ? '512,1024' : f.contexts).split(',').map((c) => Number(c.trim()));
  const chunk = f.quick && !argv.some((a) => a.startsWith('--chunk')) ? 256 : f.chunk;
  const steps = f.quick && !argv.some((a) => a.startsWith('--steps')) ? 4 : f.steps;
  if (contexts.some((c) => !Number.isInteger(c) || c < 2)) throw new UsageError(`--contexts must be integers >= 2, got '${f.contexts}'`);
  if (chunk < 1 || steps < 1 || f.runs < 1) throw new UsageError('--chunk, --steps and --runs must be at least 1');
  const command = `npm run bench -- long-context ${argv.join(' ')}`.trimEnd();
  const w = new Workdir(f.keep);
  try {
    const original = buildModel(w, f);
    const paths = VARIANTS.map((v) => (v.choice ? (compileModel(original, w.path(`${v.name}.onnx`), v.choice), w.path(`${v.name}.onnx`)) : original));
    const results = contexts.map((context) => {
      const samples = VARIANTS.map(() => [] as Probe[]);
      for (let r = 0; r < f.runs; r++) {
        for (const m of rotation(VARIANTS.length, r)) {
          log(`context ${context}, round ${r + 1}/${f.runs}: ${VARIANTS[m]!.name}`);
          samples[m]!.push(probe(paths[m]!, context, { chunk, steps, threads: f.threads, vocab: f.vocab }));
        }
      }
      return { context, samples };
    });

    const rows = results.map(({ context, samples }) => {
      const base = samples[0]!;
      const stat = (p: Probe[], pick: (x: Probe) => number) => median(p.map(pick));
      const step = (x: Probe) => median(x.stepMs);
      return {
        context,
        models: VARIANTS.map((v, m) => {
          const p = samples[m]!;
          return {
            model: v.name,
            label: v.label,
            prefillMs: stat(p, (x) => x.prefillMs),
            decodeMsPerToken: stat(p, step),
            kvBytes: stat(p, (x) => x.kvBytes),
            peakRssBytes: stat(p, (x) => x.peakRssBytes),
            kvFraction: stat(p, (x) => x.kvBytes) / stat(base, (x) => x.kvBytes),
            vsOriginal: {
              prefill: {
                ofMedians: stat(p, (x) => x.prefillMs) / stat(base, (x) => x.prefillMs),
                medianOfPaired: medianOfPaired(
                  base.map((x) => x.prefillMs),
                  p.map((x) => x.prefillMs),
                ),
              },
              decode: { ofMedians: stat(p, step) / stat(base, step), medianOfPaired: medianOfPaired(base.map(step), p.map(step)) },
              peakRss: stat(p, (x) => x.peakRssBytes) / stat(base, (x) => x.peakRssBytes),
            },
            cacheLengths: p.at(-1)!.cacheLengths,
            samples: p.map((x) => ({ prefillMs: x.prefillMs, stepMs: x.stepMs, peakRssBytes: x.peakRssBytes })),
          };
        }),
      };
    });

    if (f.json) {
      console.log(
        JSON.stringify(
          {
            bench: 'long-context',
            settings: {
              ...settingsJson(f, command),
              chunk,
              steps,
              rounds: f.runs,
              order: 'one fresh process per model, context and round; order rotating per round',
            },
            results: rows,
          },
          null,
          2,
        ),
      );
      return;
    }
    const out: string[] = [`## Long context: ${contexts.join(' and ')} tokens, batch 1`, ''];
    out.push(
      '```',
      `command: ${command}`,
      environment(f),
      modelLine(f),
      `prompt: fed in chunks of ${chunk} tokens (ModSession.forward, then extend), then ${steps} forced decode steps; one fresh process per model, context and round (${f.runs} round(s), order rotating)`,
      'MoD compiles: random routers seed 1, gated; top-k on each prompt chunk, r >= 0.5 per decode step (SPEC.md)',
      'peak RSS: getrusage maxrss of the process (node, ONNX Runtime, weights, caches and the copies onnxruntime-node makes of each output)',
      '```',
      '',
    );
    for (const r of rows) {
      out.push(`Context ${r.context} tokens:`, '');
      out.push(
        table(
          [
            'model',
            'KV bytes',
            'KV / original',
            'peak RSS',
            'RSS / original',
            'prefill',
            'prefill / original',
            'decode per token',
            'decode / original (medians)',
            'decode / original (paired)',
          ],
          r.models.map((m) => [
            m.label,
            mib(m.kvBytes),
            ratio(m.kvFraction),
            mib(m.peakRssBytes),
            ratio(m.vsOriginal.peakRss),
            ms(m.prefillMs, 0),
            ratio(m.vsOriginal.prefill.ofMedians),
            ms(m.decodeMsPerToken, 2),
            ratio(m.vsOriginal.decode.ofMedians),
            ratio(m.vsOriginal.decode.medianOfPaired),
          ]),
        ),
        '',
      );
    }
    console.log(out.join('\n'));
  } finally {
    w.dispose();
  }
}
