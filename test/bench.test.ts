/**
 * `modc bench` and the interleaving the benchmarks share: models take turns run by run and step
 * by step, the first one rotating; the report gives min/median/max, the ratio of medians, the
 * median of paired ratios and the thread count, as plain JSON.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { interleaved, median, medianOfPaired, rotation, spread } from '../compiler/apps/benchmark/benchmark.js';
import { lastPosition, ModSession } from '../compiler/runtime/session.js';
import { expectOneLineError, ROOT, runCli, tempDir } from './helpers.js';

const tmp = tempDir('modc-bench');
const LLAMA = join(ROOT, 'fixtures', 'llama-tiny', 'model.onnx');

describe('interleaving', () => {
  it('rotates the first model so each goes first equally often', () => {
    expect([0, 1, 2, 3].map((r) => rotation(2, r))).toEqual([
      [0, 1],
      [1, 0],
      [0, 1],
      [1, 0],
    ]);
    expect([0, 1, 2].map((r) => rotation(3, r)[0])).toEqual([0, 1, 2]);
  });

  it('calls the models in turn, round by round, and keeps only the timed rounds', async () => {
    const calls: string[] = [];
    const samples = await interleaved(2, 3, async (m, r) => void calls.push(`${r}:${m}`), { timed: (r) => r > 0, firstRound: 1 });
    expect(calls).toEqual(['0:1', '0:0', '1:0', '1:1', '2:1', '2:0']);
    expect(samples.map((s) => s.length)).toEqual([2, 2]);
  });

  it('statistics: median, spread, median of paired ratios', () => {
    expect(median([3, 1, 2])).toBe(2);
    expect(median([4, 1, 2, 3])).toBe(2.5);
    expect(spread([5, 1, 9])).toEqual({ min: 1, median: 5, max: 9 });
    // Paired by index: ratios 2, 0.5, 1 -> median 1, though the medians' ratio is 10/10 too here.
    expect(medianOfPaired([10, 20, 5], [20, 10, 5])).toBe(1);
    expect(medianOfPaired([10, 10, 10], [11, 12, 30])).toBe(1.2);
  });
});

describe('modc bench', () => {
  it('interleaves both models and reports spreads, both ratios, the thread count and KV bytes', async () => {
    const out = join(tmp, 'bench', 'model.onnx');
    expect((await runCli('compile', LLAMA, '-o', out, '--router-init', 'random', '-q')).code).toBe(0);
    const res = await runCli('bench', LLAMA, out, '--prompt', '16', '--batch', '2', '--steps', '3', '--runs', '2', '--warmup', '1', '--threads', '1', '--json');
    expect(res.code, res.stderr).toBe(0);
    const report = JSON.parse(res.stdout);
    expect(report.settings).toMatchObject({ promptLength: 16, batch: 2, steps: 3, runs: 2, warmup: 1, threads: 1, executionProvider: 'cpu' });
    const [a, b] = report.models;
    expect(a.model).toBe(LLAMA);
    expect(b.model).toBe(out);
    for (const m of [a, b]) {
      expect(m.prefillSamples).toHaveLength(2);
      expect(m.decodeSamples).toHaveLength(6);
      expect(m.prefill.min).toBeLessThanOrEqual(m.prefill.median);
      expect(m.prefill.median).toBeLessThanOrEqual(m.prefill.max);
      expect(m.prefillMs).toBe(median(m.prefillSamples));
      expect(m.decodeMsPerToken).toBe(median(m.decodeSamples));
    }
    const r = report.ratios[0];
    expect(r.prefill.ofMedians).toBeCloseTo(b.prefillMs / a.prefillMs, 10);
    expect(r.decode.medianOfPaired).toBeCloseTo(median(b.decodeSamples.map((t: number, i: number) => t / a.decodeSamples[i])), 10);
    // Every layer routed with about half the tokens: the compiled caches hold fewer tokens.
    expect(b.kvBytes).toBeLessThan(a.kvBytes);
    expect(r.kvBytes).toBeCloseTo(b.kvBytes / a.kvBytes, 10);
    expect(a.cacheLengths).toEqual([
      [19, 19],
      [19, 19],
      [19, 19],
    ]);
    expect(b.cacheLengths.flat().every((n: number) => n < 19)).toBe(true);
  });

  it('prints a table with the thread count; bad sizes are usage errors', async () => {
    const out = join(tmp, 'table', 'model.onnx');
    expect((await runCli('compile', LLAMA, '-o', out, '--router-init', 'all-pass', '-q')).code).toBe(0);
    const res = await runCli('bench', LLAMA, out, '--prompt', '8', '--steps', '2', '--runs', '1', '--warmup', '0');
    expect(res.code, res.stderr).toBe(0);
    expect(res.stdout).toMatch(/intra-op threads ORT default \(\d+ logical cores\)/);
    expect(res.stdout).toMatch(/median of paired ratios/);
    expectOneLineError(await runCli('bench', LLAMA, out, '--runs', '0'), 2, /--runs must be an integer >= 1/);
    expectOneLineError(await runCli('bench', LLAMA, out, '--threads=-1'), 2, /--threads must be an integer >= 0/);
  });
});

describe("ModSession.extend: a prompt in chunks (the long-context benchmark's prefill)", () => {
  it('gives the same last logits, next step and caches as one forward, original and threshold-routed', async () => {
    const routed = join(tmp, 'extend', 'model.onnx');
    expect((await runCli('compile', LLAMA, '-o', routed, '--router-init', 'random', '--seed', '4', '-q')).code).toBe(0);
    const prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14];
    for (const path of [LLAMA, routed]) {
      const [whole, chunked] = await Promise.all([ModSession.create(path), ModSession.create(path)]);
      const a = lastPosition(await whole.forward([prompt]))[0]!;
      await chunked.forward([prompt.slice(0, 4)]);
      await chunked.extend([prompt.slice(4, 7)]);
      const b = lastPosition(await chunked.extend([prompt.slice(7)]))[0]!;
      expect(Math.max(...a.map((v, i) => Math.abs(v - b[i]!))), path).toBeLessThan(1e-4);
      const sa = lastPosition(await whole.step([3]))[0]!;
      const sb = lastPosition(await chunked.step([3]))[0]!;
      expect(Math.max(...sa.map((v, i) => Math.abs(v - sb[i]!))), path).toBeLessThan(1e-4);
      expect(chunked.layerCacheLengths()).toEqual(whole.layerCacheLengths());
    }
  });

  it('refuses rows of different lengths and a call before forward()', async () => {
    const s = await ModSession.create(LLAMA);
    await expect(s.extend([[1, 2]])).rejects.toThrow(/before forward/);
    await s.forward([
      [1, 2],
      [3, 4],
    ]);
    await expect(s.extend([[1, 2], [3]])).rejects.toThrow(/same number of tokens/);
  });
});
