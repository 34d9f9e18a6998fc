/**
 * The fuzz driver: hands cases to child processes (so a case that hangs or kills its process is
 * caught and classified), gathers the outcomes, and writes a reproducer for each distinct failure.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { cleanCase, FAILURES, ORT_INPUT_STAGE, type CaseSpec, type Outcome, type OutcomeKind } from './run-case.js';
import { DIFF_ORIGINAL_STAGE } from './differential.js';

export interface FuzzOptions {
  /** Seed folders (each with model.onnx). */
  fixtures: string[];
  seed: number;
  /** Stop after this many cases ... */
  cases?: number;
  /** ... or after this many milliseconds, whichever comes first. */
  durationMs?: number;
  workers?: number;
  /** A case running longer than this is a hang. */
  timeoutMs?: number;
  /**
   * The differential check's own limit, from when it starts (default 4 x timeoutMs): it compiles
   * twice and runs the original, two compiles and the reference executor.
   */
  diffTimeoutMs?: number;
  /** Fraction of accepted cases also loaded in ONNX Runtime (input, then output). */
  ortSample?: number;
  /** Fraction of those (when the input loads) also checked by running them (differential.ts). */
  diffSample?: number;
  /** Where reproducers go (one folder per distinct failure); none when absent. */
  reproDir?: string;
  /** First case index (to continue a run). */
  start?: number;
  progress?: (stats: FuzzStats) => void;
  /** Hears every case's outcome (a replay prints it). */
  onOutcome?: (spec: CaseSpec, outcome: Outcome) => void;
}

export interface Failure {
  signature: string;
  kind: OutcomeKind;
  stage: string;
  message: string;
  fixture: string;
  seed: number;
  index: number;
  log: string[];
  count: number;
  reproducer?: string;
}

export interface FuzzStats {
  cases: number;
  ms: number;
  outcomes: Record<OutcomeKind, number>;
  /** Accepted cases loaded in ORT: how many, and how many of those had an input ORT loads. */
  ortChecked: number;
  ortInputLoaded: number;
  /** Differential checks: passed, and skipped (the original not runnable, or refused), by blurred reason. */
  diffPassed: number;
  diffSkipped: Record<string, number>;
  failures: Failure[];
  /** Refusals by stage. */
  refusedAt: Record<string, number>;
  /** Refusals by blurred message (what the inputs were refused for). */
  refusals: Record<string, number>;
}

/** A message's first line with numbers and quoted names blurred. */
function blur(message: string): string {
  return message
    .split('\n')[0]!
    .replace(/'[^']*'/g, "'…'")
    .replace(/"[^"]*"/g, '"…"')
    .replace(/\d+/g, 'N');
}

/** Failure identity: kind, stage and the message with numbers and quoted names blurred. */
export function signatureOf(o: Outcome): string {
  return `${o.kind}|${o.stage}|${blur(o.message).slice(0, 160)}`;
}

const CHILD = (() => {
  const self = fileURLToPath(import.meta.url);
  return self.endsWith('.ts')
    ? { path: self.replace(/pool\.ts$/, 'child.ts'), execArgv: ['--import', 'tsx'] }
    : { path: self.replace(/pool\.js$/, 'child.js'), execArgv: [] };
})();

/**
 * Workers run with their data segment limited (RLIMIT_DATA, 6 GiB): a mutated input that makes
 * ONNX Runtime allocate without bound (an Expand to a shape of 2^40 elements, folded at load)
 * then fails with bad_alloc in that worker instead of taking the machine's memory. The shell
 * sets the limit and execs node, which keeps the IPC channel.
 */
export const WITH_MEMORY_LIMIT = `ulimit -d ${6 * 2 ** 20} && exec "$0" "$@"`;

interface Worker {
  proc: ChildProcess;
  spec?: CaseSpec;
  timer?: NodeJS.Timeout;
  /** The tail of the process's stderr: why it died. */
  stderr: string;
  /** The stage the running case last reported. */
  stage?: string;
}

/**
 * What a case that stopped answering (timeout) or whose process died ends as: while ONNX Runtime
 * was loading the mutated input, or running it for the differential check, that is the input's
 * problem and the case counts as accepted (modc had already written and reloaded its output);
 * anywhere else it is a hang or a crash.
 */
function lost(spec: CaseSpec, stage: string | undefined, why: string, kind: 'hang' | 'crash'): Outcome {
  const log = [`fixture ${spec.fixture}`, `seed ${spec.seed} index ${spec.index}`];
  if (stage === ORT_INPUT_STAGE)
    return { kind: 'accepted', stage: 'done', message: `ONNX Runtime did not load the input (${why})`, log, inputLoadsInOrt: false };
  // Running the original mutated model (before any compile) for the differential check.
  if (stage === DIFF_ORIGINAL_STAGE)
    return {
      kind: 'accepted',
      stage: 'done',
      message: '',
      log,
      inputLoadsInOrt: true,
      differential: `skipped: ONNX Runtime did not run the original (${why})`,
    };
  return { kind, stage: kind === 'hang' ? 'timeout' : 'process', message: `${why}${stage ? ` in stage ${stage}` : ''}`, log };
}

export async function fuzz(opts: FuzzOptions): Promise<FuzzStats> {
  const workers = opts.workers ?? 2;
  const timeoutMs = opts.timeoutMs ?? 30_000;
  const ortSample = opts.ortSample ?? 0.05;
  const end = opts.durationMs !== undefined ? Date.now() + opts.durationMs : Infinity;
  const total = opts.cases ?? Infinity;
  const scratch = mkdtempSync(join(tmpdir(), 'modc-fuzz-'));
  const stats: FuzzStats = {
    cases: 0,
    ms: 0,
    ortChecked: 0,
    ortInputLoaded: 0,
    diffPassed: 0,
    diffSkipped: {},
    failures: [],
    refusedAt: {},
    refusals: {},
    outcomes: { refused: 0, accepted: 0, crash: 0, hang: 0, 'multi-line': 0, 'ort-rejected': 0, 'unloadable-output': 0, mismatch: 0 },
  };
  const bySig = new Map<string, Failure>();
  const t0 = Date.now();
  let next = opts.start ?? 0;
  let issued = 0;
  let lastProgress = Date.now();

  const record = (spec: CaseSpec, o: Outcome) => {
    opts.onOutcome?.(spec, o);
    stats.cases++;
    stats.outcomes[o.kind]++;
    if (o.kind === 'refused') {
      stats.refusedAt[o.stage] = (stats.refusedAt[o.stage] ?? 0) + 1;
      const sig = signatureOf(o)
        .replace(/^refused\|/, '')
        .replace(/^([^|]*)\|[^:]*\.onnx: /, '$1|');
      stats.refusals[sig] = (stats.refusals[sig] ?? 0) + 1;
    }
    if (o.inputLoadsInOrt !== undefined) {
      stats.ortChecked++;
      if (o.inputLoadsInOrt) stats.ortInputLoaded++;
    }
    if (o.differential?.startsWith('passed')) stats.diffPassed++;
    else if (o.differential) {
      const why = blur(o.differential).slice(0, 120);
      stats.diffSkipped[why] = (stats.diffSkipped[why] ?? 0) + 1;
    }
    if (FAILURES.includes(o.kind)) {
      const signature = signatureOf(o);
      let f = bySig.get(signature);
      if (!f) {
        f = { signature, kind: o.kind, stage: o.stage, message: o.message, fixture: spec.fixture, seed: spec.seed, index: spec.index, log: o.log, count: 0 };
        bySig.set(signature, f);
        stats.failures.push(f);
        f.count++;
        if (opts.reproDir) f.reproducer = writeReproducer(opts.reproDir, f, spec);
      } else {
        f.count++;
      }
    }
    cleanCase(spec.work);
    if (opts.progress && Date.now() - lastProgress > 10_000) {
      lastProgress = Date.now();
      stats.ms = Date.now() - t0;
      opts.progress(stats);
    }
  };

  const more = () => issued < total && Date.now() < end;

  await new Promise<void>((done) => {
    let live = 0;
    const start = (): void => {
      const proc = spawn('/bin/sh', ['-c', WITH_MEMORY_LIMIT, process.execPath, ...CHILD.execArgv, CHILD.path], { stdio: ['ignore', 'ignore', 'pipe', 'ipc'] });
      const w: Worker = { proc, stderr: '' };
      proc.stderr?.on('data', (d: Buffer) => (w.stderr = (w.stderr + d.toString()).slice(-6000)));
      live++;
      const dispatch = () => {
        if (!more()) {
          proc.disconnect();
          return;
        }
        const index = next++;
        issued++;
        w.spec = {
          fixture: opts.fixtures[index % opts.fixtures.length]!,
          seed: opts.seed,
          index,
          ort: sampled(opts.seed, index, ortSample),
          diff: sampled(opts.seed ^ 0x5bd1e995, index, opts.diffSample ?? 0),
          work: join(scratch, `c${index}`),
        };
        w.stage = undefined;
        proc.send(w.spec);
        arm(timeoutMs);
      };
      const arm = (ms: number) => {
        clearTimeout(w.timer);
        w.timer = setTimeout(() => {
          const spec = w.spec!;
          w.spec = undefined;
          record(spec, lost(spec, w.stage, `no answer after ${ms} ms`, 'hang'));
          proc.kill('SIGKILL');
        }, ms);
      };
      proc.on('message', (o: Outcome | { stage: string }) => {
        if (!('kind' in o)) {
          w.stage = o.stage;
          if (o.stage === DIFF_ORIGINAL_STAGE) arm(opts.diffTimeoutMs ?? 4 * timeoutMs);
          return;
        }
        clearTimeout(w.timer);
        const spec = w.spec;
        w.spec = undefined;
        if (spec) record(spec, o);
        dispatch();
      });
      proc.on('exit', (code, signal) => {
        clearTimeout(w.timer);
        live--;
        if (w.spec) {
          const spec = w.spec;
          w.spec = undefined;
          const why = `worker process died (${signal ?? `exit ${code}`}): ${w.stderr
            .trim()
            .split('\n')
            .filter((l) => /error|Error|at /.test(l))
            .slice(0, 6)
            .join(' | ')}`;
          record(spec, lost(spec, w.stage, why, 'crash'));
        }
        if (more()) start();
        else if (live === 0) done();
      });
      dispatch();
    };
    for (let i = 0; i < workers; i++) start();
  });
  stats.ms = Date.now() - t0;
  rmSync(scratch, { recursive: true, force: true });
  return stats;
}

/** Deterministic ORT sampling, so a replay makes the same check. */
export function sampled(seed: number, index: number, rate: number): boolean {
  if (rate <= 0) return false;
  if (rate >= 1) return true;
  return ((Math.imul(index + 1, 2654435761) ^ seed) >>> 0) / 4294967296 < rate;
}

function writeReproducer(root: string, f: Failure, spec: CaseSpec): string {
  mkdirSync(root, { recursive: true });
  let dir: string;
  for (let i = 1; ; i++) {
    dir = join(root, `${f.kind}-${String(i).padStart(3, '0')}`);
    if (!existsSync(dir)) break;
  }
  mkdirSync(dir, { recursive: true });
  if (existsSync(join(spec.work, 'in'))) cpSync(join(spec.work, 'in'), join(dir, 'in'), { recursive: true });
  writeFileSync(
    join(dir, 'case.json'),
    JSON.stringify({ ...f, reproducer: undefined, replay: `npm run fuzz -- --replay ${join(dir, 'case.json')}` }, null, 2) + '\n',
  );
  return dir;
}
