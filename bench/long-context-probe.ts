/**
 * One model at one long context, in a fresh process (for bench/long-context.ts): a prompt fed in
 * chunks (ModSession.forward, then extend), then decode steps; prints one JSON line with the
 * prefill time, each step's time, the KV bytes and per-layer cache lengths, and the peak resident
 * memory of this process (getrusage maxrss: node, ONNX Runtime, weights, caches and the copies
 * onnxruntime-node makes of them).
 *
 *   node dist/bench/long-context-probe.js MODEL.onnx CONTEXT CHUNK STEPS THREADS VOCAB
 */
import { ModSession } from '../compiler/runtime/session.js';
import { tokenIds } from './common.js';

const [model, ...nums] = process.argv.slice(2);
const [context, chunk, steps, threads, vocab] = nums.map(Number) as [number, number, number, number, number];
if (!model || ![context, chunk, steps, threads, vocab].every(Number.isInteger)) {
  console.error('usage: node dist/bench/long-context-probe.js MODEL.onnx CONTEXT CHUNK STEPS THREADS VOCAB');
  process.exit(2);
}
const rssAtStart = process.resourceUsage().maxRSS * 1024;
const session = await ModSession.create(model, threads > 0 ? { intraOpThreads: threads } : {});
const prompt = tokenIds(context, vocab, 1234);
const forced = tokenIds(steps, vocab, 99);
let t0 = performance.now();
await session.forward([prompt.slice(0, chunk)]);
for (let at = chunk; at < context; at += chunk) await session.extend([prompt.slice(at, Math.min(context, at + chunk))]);
const prefillMs = performance.now() - t0;
const kvAfterPrefill = session.kvBytes();
const stepMs: number[] = [];
for (const id of forced) {
  t0 = performance.now();
  await session.step([id]);
  stepMs.push(performance.now() - t0);
}
console.log(
  JSON.stringify({
    prefillMs,
    stepMs,
    kvAfterPrefill,
    kvBytes: session.kvBytes(),
    cacheLengths: session.layerCacheLengths().map((r) => r[0]),
    peakRssBytes: process.resourceUsage().maxRSS * 1024,
    rssAtStartBytes: rssAtStart,
  }),
);
