/**
 * The child process of fresh-process.ts: receives one FreshPlan, makes the idle sessions it
 * asks for, times the compared sessions with timeInterleaved, sends the times back and exits.
 */
import { readFileSync } from 'node:fs';
import { ModSession } from '../../runtime/session.js';
import { type CallTime, timeInterleaved } from './benchmark.js';
import type { FreshPlan, FreshTimes, WorkerMessage } from './fresh-process.js';

function send(m: WorkerMessage): Promise<void> {
  return new Promise((resolve) => process.send!(m, () => resolve()));
}

function threads(): number | null {
  try {
    return Number(/^Threads:\s+(\d+)/m.exec(readFileSync('/proc/self/status', 'utf8'))?.[1] ?? NaN);
  } catch {
    return null;
  }
}

async function run(plan: FreshPlan): Promise<FreshTimes> {
  const gc = (globalThis as { gc?: () => void }).gc;
  const gcMs: number[] = [];
  const collect = () => {
    const t0 = performance.now();
    gc?.();
    gcMs.push(performance.now() - t0);
  };
  const idle: ModSession[] = [];
  try {
    for (let i = 0; i < (plan.idle?.count ?? 0); i++) {
      const s = await ModSession.create(plan.idle!.path, plan.session);
      await s.forward(plan.idle!.prompt);
      idle.push(s);
    }
    if (plan.gc) collect();
    const threadCount = threads();
    const afterPrefill = plan.paths.map(() => ({ kvBytes: 0, cacheLengths: [] as number[][] }));
    const pending: Promise<void>[] = [];
    const times = await timeInterleaved(plan.paths, {
      prompt: plan.prompt,
      rounds: plan.rounds,
      warmupRounds: plan.warmupRounds,
      steps: plan.steps,
      warmupSteps: plan.warmupSteps,
      stepIds: (round, step) => plan.stepIds[round]![step]!,
      ...(plan.rewind ? { rewind: true } : {}),
      session: plan.session,
      beforeCall: plan.gc ? collect : undefined,
      afterCall: (e) => {
        if (e.step === null) afterPrefill[e.model] = { kvBytes: e.session.kvBytes(), cacheLengths: e.session.layerCacheLengths() };
      },
      onRound: (round: number, prefill: CallTime[]) => void pending.push(send({ kind: 'round', round, prefill })),
    });
    await Promise.all(pending);
    return { ...times, gcMs, afterPrefill, threads: threadCount };
  } finally {
    for (const s of idle) await s.session.release();
  }
}

process.once('message', (plan: FreshPlan) => {
  run(plan)
    .then((times) => send({ kind: 'done', times }))
    .catch((e: unknown) => send({ kind: 'error', message: (e instanceof Error ? e.message : String(e)).split('\n')[0]! }))
    .finally(() => process.disconnect());
});
