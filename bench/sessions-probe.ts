/**
 * Sessions of one model created one after another in a fresh process (for bench/sessions.ts):
 * after each creation and one short run, prints the process's threads and its anonymous and
 * file-backed resident memory, as one JSON line. A fresh process, because memory freed earlier
 * in the benchmark's own process (kept by its malloc settings) would hide what a session adds.
 *
 *   node dist/bench/sessions-probe.js MODEL.onnx COUNT THREADS SPINNING(0|1) VOCAB
 */
import { readFileSync } from 'node:fs';
import { ModSession } from '../compiler/runtime/session.js';
import { tokenIds } from './common.js';

const [model, ...nums] = process.argv.slice(2);
const [count, threads, spinning, vocab] = nums.map(Number) as [number, number, number, number];
if (!model || ![count, threads, spinning, vocab].every(Number.isInteger)) {
  console.error('usage: node dist/bench/sessions-probe.js MODEL.onnx COUNT THREADS SPINNING(0|1) VOCAB');
  process.exit(2);
}

function status() {
  const text = readFileSync('/proc/self/status', 'utf8');
  const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? NaN) * 1024;
  return { threads: Number(/^Threads:\s+(\d+)/m.exec(text)?.[1] ?? NaN), rssAnonBytes: kb('RssAnon'), rssFileBytes: kb('RssFile') };
}

const rows = [{ sessions: 0, ...status() }];
const sessions: ModSession[] = [];
for (let i = 1; i <= count; i++) {
  const s = await ModSession.create(model, { ...(threads > 0 ? { intraOpThreads: threads } : {}), allowSpinning: spinning === 1 });
  await s.forward([tokenIds(8, vocab, 4321)]);
  sessions.push(s);
  rows.push({ sessions: i, ...status() });
}
console.log(JSON.stringify(rows));
for (const s of sessions) await s.session.release();
