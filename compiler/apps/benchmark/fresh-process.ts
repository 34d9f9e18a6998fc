/**
 * Timing in a fresh process: the benchmarks build weights and compile models in their own
 * process, which leaves a large JavaScript heap behind, and a large heap slows the ONNX Runtime
 * calls timed beside it, unequally. Each V8 collection (a forced one before every call, and the
 * scavenges that output tensors trigger as external memory) then walks that heap; on a 2-core
 * machine the GQA all-pass compile of the decode bench measured 1.18x its original in the
 * bench's process and 1.04-1.06x in a fresh one, the same two files. So the benchmarks time their pairs in a
 * child process that holds nothing but the compared sessions (and, when asked, idle ones).
 *
 * The plan travels as plain data (interleaved-worker.ts runs it with timeInterleaved); the child
 * inherits the parent's environment, the glibc malloc settings included.
 */
import { fork } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { ModcError } from '../../core/errors.js';
import type { SessionOptions } from '../../runtime/ort.js';
import type { CallTime, InterleavedTimes } from './benchmark.js';

/** timeInterleaved's plan as data: ids per round and step, garbage collection as a flag. */
export interface FreshPlan {
  paths: string[];
  prompt: number[][];
  rounds: number;
  warmupRounds: number;
  steps: number;
  warmupSteps: number;
  /** [round][step]: the ids of that decode step, one per row. */
  stepIds: number[][][];
  /** Every decode step from the prefilled caches (timeInterleaved's `rewind`). */
  rewind?: boolean;
  session: SessionOptions;
  /** Collect garbage before every call, outside its timing. */
  gc: boolean;
  /** Sessions created (and prefilled with `prompt`) before the timed ones, left idle while they run. */
  idle?: { path: string; count: number; prompt: number[][] };
}

export interface FreshTimes extends InterleavedTimes {
  /** Each collection's time, in call order. */
  gcMs: number[];
  /** Per model, after its last prefill. */
  afterPrefill: { kvBytes: number; cacheLengths: number[][] }[];
  /** Threads of the child once its idle sessions were made, before the timed ones (Linux; else null). */
  threads: number | null;
}

/** What the worker sends back. */
export type WorkerMessage = { kind: 'round'; round: number; prefill: CallTime[] } | { kind: 'done'; times: FreshTimes } | { kind: 'error'; message: string };

/** Runs the plan in a fresh Node process; `onRound` sees each round's prefill times as they come. */
export function timeInFreshProcess(plan: FreshPlan, onRound?: (round: number, prefill: CallTime[]) => void): Promise<FreshTimes> {
  return new Promise((resolve, reject) => {
    const child = fork(workerPath(), [], { execArgv: ['--expose-gc'], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    let settled = false;
    const settle = (f: () => void) => {
      if (settled) return;
      settled = true;
      f();
    };
    child.on('message', (m: WorkerMessage) => {
      if (m.kind === 'round') onRound?.(m.round, m.prefill);
      else if (m.kind === 'done') settle(() => resolve(m.times));
      else settle(() => reject(new ModcError(m.message)));
    });
    child.on('error', (e) => settle(() => reject(new ModcError(`cannot start the timing process: ${e.message}`))));
    child.on('exit', (code, signal) =>
      settle(() => reject(new ModcError(`the timing process ended without a result (${signal ? `signal ${signal}` : `exit code ${code}`})`))),
    );
    child.send(plan);
  });
}

/** The compiled worker: beside this module, or under dist/ when this module runs from its TypeScript source (tests). */
function workerPath(): string {
  const here = fileURLToPath(new URL('./interleaved-worker.js', import.meta.url));
  if (existsSync(here)) return here;
  const built = here.replace(/\/compiler\/apps\/benchmark\/interleaved-worker\.js$/, '/dist/compiler/apps/benchmark/interleaved-worker.js');
  if (existsSync(built)) return built;
  throw new ModcError(`the timing worker ${built} is missing: run \`npm run build\``);
}
