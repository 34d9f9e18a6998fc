/**
 * Live sessions benchmark: does the number of other ONNX Runtime sessions alive in the process
 * change what one compiled model costs against its original? The same pair (original, compiled)
 * is timed decode step by step with 0 and with N extra idle sessions alive (each created and run
 * once, then left alone), alternating, `--repeat` times each. Besides the per-step ratios it
 * prints what does not depend on machine load: the process's threads and its anonymous and
 * file-backed resident memory with the extra sessions alive (each session prepacks its own copy
 * of the weights).
 */
import { spawnSync } from 'node:child_process';
import { UsageError } from '../compiler/core/errors.js';
import {
  applyQuick,
  buildModel,
  environment,
  flagHelp,
  formOf,
  granularityOf,
  log,
  mib,
  modelFlags,
  modelLine,
  parseFlags,
  sessionOptions,
  settingsJson,
  table,
  tokenIds,
  Workdir,
  type FlagSpecs,
} from './common.js';
import { type Compiled, compileAllPass, compileRouted, median, type PairTimes, ratioSpan, timePair } from './pairs.js';

export const SESSIONS_FLAGS = {
  ...modelFlags({ prompt: 512, runs: 16, warmup: 2 }),
  prompt: { kind: 'int', default: 512, help: 'prompt tokens of the timed pair (context = prompt + 1 at the first step)', min: 1 },
  runs: { kind: 'int', default: 16, help: 'timed decode steps per measurement', min: 1 },
  warmup: { kind: 'int', default: 2, help: 'untimed decode steps after the prefill' },
  extra: { kind: 'int', default: 4, help: 'extra idle sessions alive in the second configuration', min: 1 },
  'extra-model': { kind: 'string', default: 'routed', help: 'what the extra sessions load: original, all-pass or routed' },
  compiled: { kind: 'string', default: 'all-pass', help: 'the compiled model timed against the original: all-pass or routed' },
  repeat: { kind: 'int', default: 2, help: 'measurements per configuration (0 extra, N extra, 0 extra, ...)', min: 1 },
  granularity: { kind: 'string', default: 'block', help: 'what a converted layer routes: block, attention or mlp' },
} satisfies FlagSpecs;

export const SESSIONS_USAGE = `node dist/bench/run.js sessions [flags]   (npm run bench -- sessions [flags])

Times one pair (the original of --form and its --compiled model) decode step by step with 0
and with --extra idle sessions of --extra-model alive in the same process, alternating, --repeat
times each, and prints the per-step ratios (compiled / original) of every measurement next to
the process's threads and resident memory with the extra sessions alive. With --threads 2 or
more, compare a run with --spinning (ORT's default: idle sessions' workers spin) and one
without (the default here: they block).

${flagHelp(SESSIONS_FLAGS)}`;

interface ProbeRow {
  sessions: number;
  threads: number;
  rssAnonBytes: number;
  rssFileBytes: number;
}

/** Sessions of `model` created one by one in a fresh process (bench/sessions-probe.ts); null off Linux or when it fails. */
function memoryProbe(model: string, count: number, threads: number, spinning: boolean, vocab: number): ProbeRow[] | null {
  if (process.platform !== 'linux') return null;
  const script = new URL('./sessions-probe.js', import.meta.url).pathname;
  const child = spawnSync(process.execPath, [script, model, String(count), String(threads), spinning ? '1' : '0', String(vocab)], {
    encoding: 'utf8',
    maxBuffer: 1 << 24,
  });
  const line = child.stdout.trim().split('\n').at(-1) ?? '';
  if (child.status !== 0 || !line.startsWith('[')) {
    log(`memory probe failed: ${child.stderr.trim().split('\n')[0] ?? line}`);
    return null;
  }
  return JSON.parse(line) as ProbeRow[];
}

interface Measurement {
  extra: number;
  repetition: number;
  t: PairTimes;
  /** Threads of the timing process with the extra sessions alive and idle, before the pair is created. */
  threads: number | null;
}

export async function sessionsBench(argv: readonly string[]): Promise<void> {
  const f = applyQuick(parseFlags(argv, SESSIONS_FLAGS), argv, { prompt: 64, runs: 6, warmup: 1, extra: 2, repeat: 1 });
  const form = formOf(f);
  const granularity = granularityOf(f);
  const kinds = ['original', 'all-pass', 'routed'];
  if (!kinds.includes(f['extra-model'])) throw new UsageError(`--extra-model must be one of ${kinds.join(', ')}, got '${f['extra-model']}'`);
  if (f.compiled !== 'all-pass' && f.compiled !== 'routed') throw new UsageError(`--compiled must be all-pass or routed, got '${f.compiled}'`);
  const command = `npm run bench -- sessions ${argv.join(' ')}`.trimEnd();
  const w = new Workdir(f.keep);
  try {
    const totalSteps = f.warmup + f.runs;
    const original = buildModel(w, f, f.prompt + totalSteps + 1);
    const models: Record<string, Compiled> = {};
    const need = new Set([f.compiled, f['extra-model']]);
    if (need.has('all-pass')) models['all-pass'] = compileAllPass(w, original, granularity);
    if (need.has('routed'))
      models.routed = compileRouted(w, original, { granularity, capacity: f.capacity, seed: f['router-seed'], schedule: 'uniform', gated: false });
    const compiled = models[f.compiled]!;
    const extraPath = f['extra-model'] === 'original' ? original : models[f['extra-model']]!.path;
    const opts = sessionOptions(f);
    const prompt = [tokenIds(f.prompt, f.vocab, 1234)];
    const forced = tokenIds(totalSteps, f.vocab, 99);
    const idlePrompt = [tokenIds(Math.min(16, f.prompt), f.vocab, 4321)];

    const measurements: Measurement[] = [];
    for (let r = 0; r < f.repeat; r++) {
      for (const extra of [0, f.extra]) {
        log(`repetition ${r + 1}/${f.repeat}: ${extra} extra idle session(s) of ${f['extra-model']} alive; timing ${compiled.name} against the original`);
        const t = await timePair(original, compiled.path, {
          prompt,
          rounds: 1,
          warmupRounds: 0,
          steps: totalSteps,
          warmupSteps: f.warmup,
          stepIds: (s) => [forced[s]!],
          session: opts,
          gc: f.gc,
          processes: f.processes,
          ...(extra ? { idle: { path: extraPath, count: extra, prompt: idlePrompt } } : {}),
        });
        log(`  per-step ratio ${ratioSpan(t.ratios.decode.wall)} wall, ${ratioSpan(t.ratios.decode.cpu)} CPU`);
        measurements.push({ extra, repetition: r + 1, t, threads: t.threads });
      }
    }

    log(`memory probe: ${f.extra} sessions of ${f['extra-model']} created one by one in a fresh process`);
    const memory = memoryProbe(extraPath, f.extra, f.threads, f.spinning, f.vocab);
    const perSession = memory && memory.length > 1 ? (pick: (r: ProbeRow) => number) => (pick(memory.at(-1)!) - pick(memory[0]!)) / (memory.length - 1) : null;

    const byExtra = (n: number) => measurements.filter((m) => m.extra === n);
    const pooled = (n: number, pick: (m: Measurement) => number[]) => median(byExtra(n).flatMap(pick));
    const ratiosOf = (m: Measurement, kind: 'wall' | 'cpu') =>
      m.t.compiled.steps.map((s, i) => (kind === 'wall' ? s.wallMs / m.t.original.steps[i]!.wallMs : s.cpuMs / m.t.original.steps[i]!.cpuMs));
    const summary = [0, f.extra].map((n) => ({
      extra: n,
      pooledPerStepRatio: { wall: pooled(n, (m) => ratiosOf(m, 'wall')), cpu: pooled(n, (m) => ratiosOf(m, 'cpu')) },
    }));

    if (f.json) {
      console.log(
        JSON.stringify(
          {
            bench: 'sessions',
            form,
            settings: {
              ...settingsJson(f, command),
              prompt: f.prompt,
              warmupSteps: f.warmup,
              timedSteps: f.runs,
              compiled: compiled.label,
              extraModel: f['extra-model'],
              extra: f.extra,
              repeat: f.repeat,
              order: 'per repetition: 0 extra sessions, then --extra; each measurement times the pair (original, compiled) interleaved step by step',
            },
            measurements: measurements.map((m) => ({
              extra: m.extra,
              repetition: m.repetition,
              perStepRatio: { wall: m.t.ratios.decode.wall, cpu: m.t.ratios.decode.cpu },
              originalMedianStepMs: median(m.t.original.steps.map((s) => s.wallMs)),
              compiledMedianStepMs: median(m.t.compiled.steps.map((s) => s.wallMs)),
              threads: m.threads,
            })),
            summary,
            memory: memory
              ? { freshProcess: memory, perSession: { rssAnonBytes: perSession!((r) => r.rssAnonBytes), threads: perSession!((r) => r.threads) } }
              : null,
          },
          null,
          2,
        ),
      );
      return;
    }
    const out: string[] = [];
    out.push(`## Live sessions: ${form} form, ${compiled.name} against the original with 0 and ${f.extra} extra idle sessions of ${f['extra-model']}`, '');
    out.push(
      '```',
      `command: ${command}`,
      environment(f),
      modelLine(f),
      `compiled: ${compiled.label}`,
      `timing: per measurement, the pair (original, ${compiled.name}) created, prefilled with ${f.prompt} tokens, stepped interleaved (${f.warmup} untimed + ${f.runs} timed steps), released; the extra sessions were created and run once (${idlePrompt[0]!.length} tokens) before, and are idle during the timing`,
      '```',
      '',
    );
    out.push(
      table(
        [
          'extra idle sessions',
          'repetition',
          'per-step ratio: median (min - max)',
          'CPU per-step ratio: median (min - max)',
          'original median step',
          'process threads with the extra sessions alive',
        ],
        measurements.map((m) => [
          String(m.extra),
          String(m.repetition),
          ratioSpan(m.t.ratios.decode.wall),
          ratioSpan(m.t.ratios.decode.cpu),
          `${median(m.t.original.steps.map((s) => s.wallMs)).toFixed(2)} ms`,
          m.threads === null ? 'n/a' : String(m.threads),
        ]),
      ),
      '',
    );
    out.push(
      table(
        ['extra idle sessions', 'per-step ratio, all repetitions pooled (median)', 'CPU, pooled (median)'],
        summary.map((s) => [String(s.extra), `${s.pooledPerStepRatio.wall.toFixed(3)}x`, `${s.pooledPerStepRatio.cpu.toFixed(3)}x`]),
      ),
      '',
    );
    if (memory) {
      out.push(
        `Memory and threads as sessions of ${f['extra-model']} are created one by one (each run once) in a fresh process; these do not depend on machine load:`,
        '',
      );
      out.push(
        table(
          ['sessions alive', 'threads', 'anonymous resident', 'file-backed resident'],
          memory.map((r) => [String(r.sessions), String(r.threads), mib(r.rssAnonBytes), mib(r.rssFileBytes)]),
        ),
        '',
        `Each session adds ${mib(perSession!((r) => r.rssAnonBytes))} of anonymous memory (its own prepacked weights and buffers) and ${perSession!((r) => r.threads).toFixed(1)} threads.`,
      );
    }
    console.log(out.join('\n'));
  } finally {
    w.dispose();
  }
}
