/**
 * `npm run fuzz -- --minutes N --seed S`: the seeded mutation fuzzer's long run (see
 * docs/reliability.md). Mutates the fixtures (and compiled versions of them) at the protobuf and IR
 * level, runs each case through load -> inspect -> analyse -> compile -> save in a child process
 * with a time limit, loads a sample in ONNX Runtime, checks that compiling a sample of those
 * keeps the model's meaning (all-pass against the original, random routers against the reference
 * executor), and writes a reproducer per distinct failure.
 *
 *   --minutes N      stop after N minutes (default 1)
 *   --cases N        ... or after N cases
 *   --seed S         run seed (default 1)
 *   --workers W      child processes (default: CPU count)
 *   --ort-sample R   fraction of accepted cases loaded in ONNX Runtime (default 0.05)
 *   --diff-sample R  fraction of those whose input loads that also run the differential check (default 1)
 *   --timeout-ms T   a case slower than this is a hang (default 30000)
 *   --out DIR        reproducers (default fuzz-out/)
 *   --models DIR     also use the models in DIR's subfolders as seeds
 *   --replay FILE    rerun one reproducer's case.json in this process and print the outcome
 *   --json           print the final figures as JSON
 * Exit code: 0 when no failure was found, 1 otherwise.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { fuzz, type FuzzStats } from '../test/fuzz/pool.js';
import type { Outcome } from '../test/fuzz/run-case.js';
import { modelFolders, seedModels } from '../test/fuzz/seeds.js';

function summary(s: FuzzStats): string {
  const o = s.outcomes;
  const rate = s.ms ? (s.cases / (s.ms / 1000)).toFixed(1) : '0';
  return [
    `${s.cases} cases in ${(s.ms / 1000).toFixed(0)} s (${rate}/s): refused ${o.refused}, accepted ${o.accepted}; crash ${o.crash}, hang ${o.hang}, multi-line ${o['multi-line']}, ort-rejected ${o['ort-rejected']}, unloadable-output ${o['unloadable-output']}, mismatch ${o.mismatch}`,
    `ORT checks: ${s.ortChecked} accepted cases loaded, ${s.ortInputLoaded} with an input ORT loads; differential checks: ${s.diffPassed} passed, ${o.mismatch} mismatched, ${Object.values(s.diffSkipped).reduce((a, n) => a + n, 0)} not run; distinct failures: ${s.failures.length}`,
  ].join('\n');
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      minutes: { type: 'string' },
      cases: { type: 'string' },
      seed: { type: 'string' },
      workers: { type: 'string' },
      'ort-sample': { type: 'string' },
      'diff-sample': { type: 'string' },
      'timeout-ms': { type: 'string' },
      out: { type: 'string' },
      models: { type: 'string', multiple: true },
      replay: { type: 'string' },
      json: { type: 'boolean' },
    },
  });
  const num = (v: string | undefined, d: number) => {
    if (v === undefined) return d;
    const n = Number(v);
    if (!Number.isFinite(n) || n < 0) throw new Error(`not a number: ${v}`);
    return n;
  };
  if (values.replay) {
    // Through the pool, as the case ran: a worker under the memory limit, the same time limits,
    // and a process that dies classified by the stage it died in.
    const c = JSON.parse(readFileSync(values.replay, 'utf8')) as { fixture: string; seed: number; index: number; kind: string };
    let outcome: Outcome | undefined;
    await fuzz({
      fixtures: [c.fixture],
      seed: c.seed,
      start: c.index,
      cases: 1,
      workers: 1,
      ortSample: 1,
      diffSample: 1,
      timeoutMs: num(values['timeout-ms'], 30_000),
      onOutcome: (_spec, o) => (outcome = o),
    });
    console.log(JSON.stringify(outcome, null, 2));
    return outcome && (outcome.kind === 'refused' || outcome.kind === 'accepted') ? 0 : 1;
  }
  const scratch = mkdtempSync(join(tmpdir(), 'modc-fuzz-seeds-'));
  try {
    const fixtures = seedModels(
      scratch,
      (values.models ?? []).flatMap((d) => modelFolders(resolve(d))),
    );
    const seed = num(values.seed, 1);
    const minutes = num(values.minutes, values.cases ? Infinity : 1);
    const out = resolve(values.out ?? 'fuzz-out');
    console.error(
      `fuzz: seed ${seed}, ${fixtures.length} seed models, ${Number.isFinite(minutes) ? `${minutes} min` : ''}${values.cases ? ` ${values.cases} cases` : ''}; reproducers in ${out}`,
    );
    const stats = await fuzz({
      fixtures,
      seed,
      cases: values.cases ? num(values.cases, 0) : undefined,
      durationMs: Number.isFinite(minutes) ? minutes * 60_000 : undefined,
      workers: num(values.workers, availableParallelism()),
      ortSample: num(values['ort-sample'], 0.05),
      diffSample: num(values['diff-sample'], 1),
      timeoutMs: num(values['timeout-ms'], 30_000),
      reproDir: out,
      progress: (s) => console.error(summary(s).split('\n')[0]),
    });
    console.log(values.json ? JSON.stringify(stats, null, 2) : summary(stats));
    if (!values.json) {
      console.log(
        `refused at: ${Object.entries(stats.refusedAt)
          .map(([k, n]) => `${k} ${n}`)
          .join(', ')}`,
      );
      const skips = Object.entries(stats.diffSkipped).sort((a, b) => b[1] - a[1]);
      if (skips.length) {
        console.log('differential checks not run:');
        for (const [why, n] of skips.slice(0, 8)) console.log(`  ${String(n).padStart(6)}  ${why}`);
      }
      console.log('most common refusals:');
      for (const [sig, n] of Object.entries(stats.refusals)
        .sort((a, b) => b[1] - a[1])
        .slice(0, 12))
        console.log(`  ${String(n).padStart(6)}  ${sig}`);
    }
    for (const f of stats.failures) console.log(`  ${f.kind} x${f.count} at ${f.stage}: ${f.message.split('\n')[0]} -> ${f.reproducer ?? '(no reproducer)'}`);
    return stats.failures.length ? 1 : 0;
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
}

process.exitCode = await main();
