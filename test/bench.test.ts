/**
 * `modc bench` and the interleaving the benchmarks share: models take turns run by run and step
 * by step, the first one rotating; the report gives min/median/max, the ratio of medians, the
 * median of paired ratios and the thread count, as plain JSON. The benchmarks under bench/: their
 * flags (node:util parseArgs through the CLI's option helpers), and the --keep contract of the
 * decode benchmark (the kept folder holds the original with its weights and the compiled models).
 */
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { interleaved, mallocSettings, median, medianOfPaired, pairedRatios, rotation, spread } from '../compiler/apps/benchmark/benchmark.js';
import { timeInFreshProcess } from '../compiler/apps/benchmark/fresh-process.js';
import { ModcError } from '../compiler/core/errors.js';
import { UsageError } from '../compiler/core/errors.js';
import { loadModel } from '../compiler/core/io/load.js';
import { lastPosition, ModSession } from '../compiler/runtime/session.js';
import { formOf, granularityOf, originalFeeds, parseFlags, timeUnits } from '../bench/common.js';
import { decoderIo } from '../compiler/metadata/decoder-io.js';
import { DECODE_FLAGS } from '../bench/decode.js';
import { mapLayers } from '../bench/recipe.js';
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

describe('timing in a fresh process', () => {
  const plan = (paths: string[]) => ({
    paths,
    prompt: [[1, 2, 3, 4, 5, 6]],
    rounds: 2,
    warmupRounds: 1,
    steps: 3,
    warmupSteps: 1,
    stepIds: [
      [[7], [8], [9]],
      [[10], [11], [12]],
    ],
    session: { intraOpThreads: 1 },
    gc: true,
  });

  it('times the pair in a child process: the timed rounds and steps, a collection per call, caches after the prefill, idle sessions', async () => {
    const rounds: number[] = [];
    const t = await timeInFreshProcess({ ...plan([LLAMA, LLAMA]), idle: { path: LLAMA, count: 2, prompt: [[1, 2]] } }, (r) => rounds.push(r));
    expect(rounds).toEqual([0, 1]);
    expect(t.prefill.map((p) => p.length)).toEqual([1, 1]);
    expect(t.decode.map((d) => d.length)).toEqual([2, 2]);
    expect(t.decode.flat().every((c) => c.wallMs > 0 && c.cpuMs >= 0)).toBe(true);
    // One collection after the idle sessions, then one before each of 2 x (1 prefill + 3 steps) x 2 models.
    expect(t.gcMs).toHaveLength(1 + 16);
    // After the prefill each layer holds the 6 prompt tokens; after the last step 9.
    expect(t.afterPrefill.map((a) => a.cacheLengths.every((l) => l[0] === 6))).toEqual([true, true]);
    expect(t.cacheLengths[0]!.every((l) => l[0] === 9)).toBe(true);
    expect(t.afterPrefill[0]!.kvBytes).toBeGreaterThan(0);
    if (process.platform === 'linux') expect(t.threads).toBeGreaterThan(0);
  });

  it('a model the child cannot load is a one-line ModcError', async () => {
    const missing = join(tmp, 'no-such-model.onnx');
    const err = await timeInFreshProcess(plan([LLAMA, missing])).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ModcError);
    expect((err as Error).message).toContain(missing);
    expect((err as Error).message.split('\n')).toHaveLength(1);
  });
});

describe('unit times', () => {
  it("with parts, each layer is cut into its attention unit and the rest, both timed (a part's share of its layer)", async () => {
    const feeds = originalFeeds(decoderIo(loadModel(LLAMA)), [5], 8);
    const t = await timeUnits(LLAMA, join(tmp, 'units'), feeds, 2, 1, { intraOpThreads: 1 }, { parts: true });
    expect(t.parts).toHaveLength(t.layers.length);
    for (const p of t.parts!) {
      expect(p).not.toBeNull();
      expect([p!.attention > 0, p!.mlp > 0]).toEqual([true, true]);
    }
    const plain = await timeUnits(LLAMA, join(tmp, 'units-plain'), feeds, 1, 0, { intraOpThreads: 1 });
    expect(plain.parts).toBeUndefined();
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
    const perStep = b.decodeSamples.map((t: number, i: number) => t / a.decodeSamples[i]);
    expect(r.decode.medianOfPaired).toBeCloseTo(median(perStep), 10);
    expect(r.decode.paired).toEqual({ min: Math.min(...perStep), median: r.decode.medianOfPaired, max: Math.max(...perStep) });
    expect(r.cpu.decode.medianOfPaired).toBeCloseTo(median(b.decodeCpuSamples.map((t: number, i: number) => t / a.decodeCpuSamples[i])), 10);
    // Only the two sessions compared are alive, idle ORT workers block; in this process glibc's defaults.
    expect(report.settings).toMatchObject({ liveSessions: 2, spinning: 'off', malloc: 'glibc defaults' });
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

describe('modc bench through bin/modc.js', () => {
  it("runs itself again under the benchmarks' malloc settings, unless --default-malloc", async () => {
    const out = join(tmp, 'malloc', 'model.onnx');
    expect((await runCli('compile', LLAMA, '-o', out, '--router-init', 'all-pass', '-q')).code).toBe(0);
    const run = (extra: string[] = [], tunables?: string) => {
      const env = { ...process.env };
      delete env.MALLOC_MMAP_THRESHOLD_;
      delete env.MALLOC_TRIM_THRESHOLD_;
      delete env.GLIBC_TUNABLES;
      if (tunables) env.GLIBC_TUNABLES = tunables;
      const res = spawnSync(
        process.execPath,
        [join(ROOT, 'bin', 'modc.js'), 'bench', LLAMA, out, '--prompt', '4', '--steps', '1', '--runs', '1', '--warmup', '0', '--json', ...extra],
        { encoding: 'utf8', env },
      );
      expect(res.status, res.stderr).toBe(0);
      return JSON.parse(res.stdout).settings.malloc as string;
    };
    if (process.platform === 'linux') {
      expect(run()).toBe('MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 GLIBC_TUNABLES=glibc.malloc.hugetlb=1');
      // A caller's own tunables are kept, not replaced.
      expect(run([], 'glibc.malloc.arena_max=2')).toBe(
        'MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 GLIBC_TUNABLES=glibc.malloc.arena_max=2',
      );
    }
    expect(run(['--default-malloc'])).toBe('glibc defaults');
  });
});

describe('mallocSettings', () => {
  it('names each benchmark malloc variable that is set, glibc tunables included', () => {
    expect(mallocSettings({})).toBe('glibc defaults');
    expect(mallocSettings({ GLIBC_TUNABLES: 'glibc.malloc.hugetlb=1' })).toBe('GLIBC_TUNABLES=glibc.malloc.hugetlb=1');
    expect(mallocSettings({ GLIBC_TUNABLES: 'glibc.malloc.hugetlb=1', MALLOC_TRIM_THRESHOLD_: '4294967296', HOME: '/root' })).toBe(
      'MALLOC_TRIM_THRESHOLD_=4294967296 GLIBC_TUNABLES=glibc.malloc.hugetlb=1',
    );
  });
});

describe('bench/ flags', () => {
  it('defaults: the bench shape (hidden 1024, 8 layers, vocab 32000), llama form, block granularity', () => {
    const f = parseFlags([], DECODE_FLAGS);
    expect([f.form, f.hidden, f.layers, f.heads, f.vocab, f.granularity, f.threads, f.gc, f.keep]).toEqual([
      'llama',
      1024,
      8,
      16,
      32000,
      'block',
      0,
      true,
      false,
    ]);
  });

  it('takes --name value, --name=value, --no-flag and negative numbers as values', () => {
    const f = parseFlags(
      ['--form', 'gpt2', '--prompt=16', '--runs', '3', '--no-gc', '--keep', '--capacity', '0.25', '--granularity=mlp', '--batch', '2'],
      DECODE_FLAGS,
    );
    expect([f.form, f.prompt, f.runs, f.gc, f.keep, f.capacity, f.granularity, f.batch]).toEqual(['gpt2', 16, 3, false, true, 0.25, 'mlp', 2]);
    // A negative number after a flag is its value, refused by the range check rather than by the parser.
    expect(() => parseFlags(['--router-seed', '-3'], DECODE_FLAGS)).toThrow(/--router-seed must be an integer >= 0/);
  });

  it('refuses unknown flags, missing values, stray arguments and values out of range, as usage errors', () => {
    const bad: [string[], RegExp][] = [
      [['--frob'], /Unknown option '--frob'.*\(see --help\)/],
      [['--runs'], /--runs.*argument missing/],
      [['decode'], /Unexpected argument 'decode'/],
      [['--runs', '0'], /--runs must be an integer >= 1/],
      [['--runs', '1.5'], /--runs must be an integer >= 1/],
      [['--capacity', 'half'], /--capacity must be a number, got 'half'/],
      [['--keep=yes'], /--keep.*does not take an argument/],
    ];
    for (const [argv, pattern] of bad) {
      let err: unknown;
      try {
        parseFlags(argv, DECODE_FLAGS);
      } catch (e) {
        err = e;
      }
      expect(err, argv.join(' ')).toBeInstanceOf(UsageError);
      expect((err as Error).message, argv.join(' ')).toMatch(pattern);
    }
    expect(() => formOf({ form: 'bert' })).toThrow(/--form must be one of llama, gqa, mha, standard, gpt2, got 'bert'/);
    expect(() => granularityOf({ granularity: 'ffn' })).toThrow(/--granularity must be one of block, attention, mlp/);
  });

  it("recipe: a quality layer l of L covers bench layers round(l L'/L) .. round((l+1) L'/L) - 1", () => {
    expect([0, 1, 2, 3, 4, 5].map((l) => mapLayers(l, 6, 8))).toEqual([[0], [1, 2], [3], [4], [5, 6], [7]]);
    expect([0, 1, 2, 3, 4, 5].map((l) => mapLayers(l, 6, 4))).toEqual([[0], [], [1], [2], [], [3]]);
    expect([0, 1, 2].map((l) => mapLayers(l, 3, 3))).toEqual([[0], [1], [2]]);
  });

  const bench = (...args: string[]) => spawnSync(process.execPath, [join(ROOT, 'dist', 'bench', 'run.js'), ...args], { encoding: 'utf8' });

  it('run.js: --help per benchmark, and a bad flag is one line and exit code 2', () => {
    for (const name of ['decode', 'prefill', 'recipe', 'sessions']) {
      const res = bench(name, '--help');
      expect(res.status, name).toBe(0);
      expect(res.stdout).toMatch(/--form S/);
      expect(res.stdout).toMatch(/--threads N/);
    }
    const res = bench('decode', '--frob', '--default-malloc');
    expect(res.status).toBe(2);
    expect(res.stderr.trim()).toMatch(/^bench: Unknown option '--frob'/);
    expect(res.stderr.trim().split('\n')).toHaveLength(1);
  });

  it('decode --keep: prints "kept DIR"; DIR holds original.onnx with its non-zero weights and the compiled models; the JSON has one pair per compiled model, its steps pooled over --processes', () => {
    const sizes = ['--hidden', '32', '--layers', '2', '--heads', '2', '--kv-heads', '2', '--intermediate', '64', '--vocab', '128'];
    const flags = ['--prompt', '8', '--runs', '2', '--warmup', '1', '--unit-runs', '1', '--threads', '1', '--processes', '2'];
    const res = bench('decode', ...sizes, ...flags, '--keep', '--json');
    expect(res.status, res.stderr).toBe(0);
    const dir = /kept (\S+)/.exec(res.stderr)?.[1];
    expect(dir).toBeDefined();
    try {
      for (const f of ['original.onnx', 'weights.bin', 'all-pass.onnx', 'routed.onnx']) expect(existsSync(join(dir!, f)), f).toBe(true);
      const original = loadModel(join(dir!, 'original.onnx'));
      const q = original.graph.initializers.get('model.layers.0.self_attn.q_proj.weight')!.initializer!;
      expect(q.dims).toEqual([32, 32]);
      expect((q.toArray() as Float32Array).every((v) => v !== 0)).toBe(true);
      expect(readFileSync(join(dir!, 'weights.bin')).some((b) => b !== 0)).toBe(true);
      const report = JSON.parse(res.stdout);
      expect(report.form).toBe('llama');
      expect(report.pairs.map((p: { model: string; liveSessions: number }) => [p.model, p.liveSessions])).toEqual([
        ['all-pass', 2],
        ['routed', 2],
      ]);
      for (const p of report.pairs) {
        // 2 timed steps in each of 2 processes.
        const perStep = pairedRatios(p.original.steps, p.compiled.steps);
        expect(perStep).toHaveLength(4);
        expect(p.perStepRatio.wall.paired).toEqual({ min: Math.min(...perStep), median: median(perStep), max: Math.max(...perStep) });
        // Process 0 made the original first, process 1 the compiled one: each order's steps on their own.
        expect(p.perStepRatioByOrder).toEqual({ originalFirst: median(perStep.slice(0, 2)), compiledFirst: median(perStep.slice(2)) });
      }
      // Every step started from the prefilled caches: the all-pass layers hold the 8 prompt tokens and the last step's one.
      expect(report.pairs[0].cacheLengthsAtEnd).toEqual([[9], [9]]);
      // The routed model: both layers routed, its skip rates from the timed steps, and an ideal.
      expect(report.routed.parts.map((p: { layer: number; part: string; steps: number }) => [p.layer, p.part, p.steps])).toEqual([
        [0, 'block', 2],
        [1, 'block', 2],
      ]);
      expect(report.routed.ideal.achievedOverIdeal).toBeGreaterThan(0);
    } finally {
      rmSync(dir!, { recursive: true, force: true });
    }
  });

  it('decode --form gpt2 --keep: the fused GPT-2 form at the given shape, compiled', () => {
    const sizes = ['--hidden', '32', '--layers', '2', '--heads', '2', '--kv-heads', '2', '--intermediate', '64', '--vocab', '128'];
    const res = bench(
      'decode',
      '--form',
      'gpt2',
      ...sizes,
      '--prompt',
      '8',
      '--runs',
      '1',
      '--warmup',
      '0',
      '--unit-runs',
      '1',
      '--threads',
      '1',
      '--no-routed',
      '--keep',
    );
    expect(res.status, res.stderr).toBe(0);
    const dir = /kept (\S+)/.exec(res.stderr)?.[1];
    try {
      const ops = loadModel(join(dir!, 'original.onnx')).graph.nodes.map((n) => n.opType);
      expect(ops.filter((o) => o === 'Attention')).toHaveLength(2);
      expect(existsSync(join(dir!, 'all-pass.onnx'))).toBe(true);
      expect(existsSync(join(dir!, 'routed.onnx'))).toBe(false);
      expect(res.stdout).toMatch(/## Decode: gpt2 form/);
    } finally {
      rmSync(dir!, { recursive: true, force: true });
    }
  });
});

describe('targets: the decode benchmark over the combinations the speed targets name', () => {
  const bench = (...args: string[]) => spawnSync(process.execPath, [join(ROOT, 'dist', 'bench', 'run.js'), ...args], { encoding: 'utf8' });
  const sizes = ['--hidden', '32', '--layers', '2', '--heads', '2', '--kv-heads', '2', '--intermediate', '64', '--vocab', '128'];
  const steps = ['--runs', '1', '--warmup', '0', '--processes', '1'];

  it('one row per form x granularity x prompt and the batched row, each target checked against its own bound', () => {
    const res = bench(
      'targets',
      '--forms',
      'llama',
      '--granularities',
      'block,mlp',
      '--prompts',
      '8',
      '--batch-prompt',
      '6',
      '--batch',
      '2',
      ...steps,
      ...sizes,
      '--json',
    );
    expect(res.status, res.stderr).toBe(0);
    const report = JSON.parse(res.stdout);
    expect(report.rows.map((r: { form: string; granularity: string; prompt: number; batch: number }) => [r.form, r.granularity, r.prompt, r.batch])).toEqual([
      ['llama', 'block', 8, 1],
      ['llama', 'mlp', 8, 1],
      ['llama', 'block', 6, 2],
    ]);
    let met = 0;
    for (const r of report.rows) {
      expect(r.error).toBeNull();
      expect(r.command).toContain(`--granularity ${r.granularity} --prompt ${r.prompt}`);
      expect(r.originalStepMs).toBeGreaterThan(0);
      // 1.05x at batch 1, 1.10x batched; achieved / ideal >= 0.9.
      expect(r.allPass.target).toBe(r.batch > 1 ? 1.1 : 1.05);
      expect(r.allPass.ratio).toBeGreaterThan(0);
      expect(r.allPass.met).toBe(r.allPass.ratio <= r.allPass.target);
      expect(r.routed.target).toBe(0.9);
      expect(r.routed.achievedOverIdeal).toBeGreaterThan(0);
      expect(r.routed.met).toBe(r.routed.achievedOverIdeal >= 0.9);
      met += Number(r.allPass.met) + Number(r.routed.met);
    }
    expect([report.met, report.checks, report.failed]).toEqual([met, 6, 0]);
  });

  it('--help names the list flags', () => {
    const res = bench('targets', '--help');
    expect(res.status).toBe(0);
    for (const flag of ['--forms S', '--granularities S', '--prompts S', '--batch-prompt N']) expect(res.stdout).toContain(flag);
  });

  it('a combination that cannot run is a row saying why, and exit code 1; bad lists are usage errors', () => {
    const res = bench(
      'targets',
      '--forms',
      'gqa',
      '--granularities',
      'block',
      '--prompts',
      '8',
      '--batch-prompt',
      '0',
      '--no-routed',
      ...steps,
      ...sizes.slice(0, 4),
      '--heads',
      '3',
      '--kv-heads',
      '3',
    );
    expect(res.status).toBe(1);
    expect(res.stdout).toMatch(/\| gqa \| 8 \| 1 \| block \| failed: --hidden 32 is not a multiple of --heads 3 \|/);
    expect(res.stderr.trim().split('\n').at(-1)).toBe('bench: 1 of 1 combinations failed to run; their rows say why');
    for (const [flag, value, message] of [
      ['--forms', 'llama,foo', /--forms: 'foo' is not one of llama, gqa, mha, standard, gpt2/],
      ['--granularities', '', /--granularities needs at least one value/],
      ['--prompts', '512,x', /--prompts: 'x' is not a positive integer/],
    ] as const) {
      const bad = bench('targets', flag, value);
      expect(bad.status, flag).toBe(2);
      expect(bad.stderr.trim()).toMatch(message);
    }
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
