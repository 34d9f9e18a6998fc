/**
 * What the benchmarks share: flags, timing statistics, Markdown tables, building a seeded
 * builder model in a temp folder, compiling it, and timing the original model unit by unit
 * (prefix, each layer, suffix) to find where its time goes.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { cpus, tmpdir, totalmem } from 'node:os';
import { join } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { extractDecoder } from '../compiler/analysis/extract.js';
import { LayerByLayerRunner } from '../compiler/runtime/layer-runner.js';
import { UsageError } from '../compiler/core/errors.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { runPipeline } from '../compiler/passes/pass-manager.js';
import { type PlanRequest, type RoutingPlan } from '../compiler/routing/routing-plan.js';
import { type DecoderIo } from '../compiler/metadata/decoder-io.js';
import { ort, type SessionOptions } from '../compiler/runtime/ort.js';
import { typed } from '../compiler/runtime/session.js';
import { type DecoderConfig, writeLlamaModel } from '../fixtures/builder/index.js';
import { splitFusedBoundaries } from '../compiler/passes/split-fused-boundaries.js';
import { defaultRegistry } from '../compiler/passes/pipeline.js';

// ---------------------------------------------------------------- flags

export interface FlagSpec {
  kind: 'int' | 'float' | 'bool' | 'string';
  default: number | boolean | string;
  help: string;
}

export type FlagSpecs = Record<string, FlagSpec>;
export type Flags<S extends FlagSpecs> = { [K in keyof S]: S[K]['kind'] extends 'bool' ? boolean : S[K]['kind'] extends 'string' ? string : number };

/** `--name value`, `--name=value`, and `--flag` / `--no-flag` for booleans. */
export function parseFlags<S extends FlagSpecs>(argv: readonly string[], specs: S): Flags<S> {
  const out: Record<string, number | boolean | string> = {};
  for (const [k, s] of Object.entries(specs)) out[k] = s.default;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const m = /^--(no-)?([a-z0-9-]+)(?:=(.*))?$/.exec(arg);
    if (!m) throw new UsageError(`unexpected argument '${arg}' (flags look like --name value; see --help)`);
    const [, no, name, inline] = m;
    const spec = specs[name!];
    if (!spec) throw new UsageError(`unknown flag --${name} (see --help)`);
    if (spec.kind === 'bool') {
      if (inline !== undefined) throw new UsageError(`--${name} takes no value`);
      out[name!] = !no;
      continue;
    }
    if (no) throw new UsageError(`--no-${name}: only boolean flags can be negated`);
    const raw = inline ?? argv[++i];
    if (raw === undefined) throw new UsageError(`--${name} needs a value`);
    if (spec.kind === 'string') out[name!] = raw;
    else {
      const v = Number(raw);
      if (!Number.isFinite(v) || (spec.kind === 'int' && !Number.isInteger(v)))
        throw new UsageError(`--${name} needs ${spec.kind === 'int' ? 'an integer' : 'a number'}, got '${raw}'`);
      out[name!] = v;
    }
  }
  return out as Flags<S>;
}

export function flagHelp(specs: FlagSpecs): string {
  const rows = Object.entries(specs).map(([k, s]) => [
    `--${k}${s.kind === 'bool' ? '' : ` ${s.kind === 'string' ? 'S' : 'N'}`}`,
    `${s.help} (default: ${s.default})`,
  ]);
  const w = Math.max(...rows.map((r) => r[0]!.length));
  return rows.map(([a, b]) => `  ${a!.padEnd(w)}  ${b}`).join('\n');
}

/** Flags every benchmark takes for the model it builds. */
export function modelFlags(defaults: { prompt: number; runs: number; warmup: number }) {
  return {
    hidden: { kind: 'int', default: 1024, help: 'hidden size' },
    layers: { kind: 'int', default: 8, help: 'decoder layers' },
    heads: { kind: 'int', default: 16, help: 'attention heads' },
    'kv-heads': { kind: 'int', default: 16, help: 'key/value heads (GQA when < heads)' },
    intermediate: { kind: 'int', default: 2816, help: 'MLP intermediate size' },
    vocab: { kind: 'int', default: 32000, help: 'vocabulary size' },
    'max-positions': { kind: 'int', default: 2048, help: 'builder maxPositions (the Llama form computes RoPE in-graph; this does not cap positions)' },
    prompt: { kind: 'int', default: defaults.prompt, help: 'prompt tokens (batch 1)' },
    runs: { kind: 'int', default: defaults.runs, help: 'timed runs (median reported)' },
    warmup: { kind: 'int', default: defaults.warmup, help: 'untimed warm-up runs' },
    capacity: { kind: 'float', default: 0.5, help: 'top-k capacity of the converted layers' },
    'router-seed': { kind: 'int', default: 1, help: 'seed of the random routers' },
    'weight-seed': { kind: 'int', default: 7, help: 'seed of the model weights' },
    threads: { kind: 'int', default: 0, help: 'ORT intra-op threads (0: ORT default, one per physical core)' },
    ep: { kind: 'string', default: 'cpu', help: 'execution provider: cpu or cuda (see docs/serving.md, "CUDA")' },
    json: { kind: 'bool', default: false, help: 'print the results as one JSON object on stdout instead of Markdown tables' },
    gc: { kind: 'bool', default: true, help: 'collect garbage (old logits and KV tensors) before each timed run, outside the timing; --no-gc leaves it to V8' },
    keep: { kind: 'bool', default: false, help: 'keep the temp folder with the models' },
    'default-malloc': { kind: 'bool', default: false, help: 'keep glibc malloc defaults instead of re-running with MALLOC_ENV (see run.js --help)' },
    quick: { kind: 'bool', default: false, help: 'small sizes for a smoke run (hidden 256, 4 layers, vocab 4096, prompt 128, 2 runs)' },
  } satisfies FlagSpecs;
}

export type ModelFlags = Flags<ReturnType<typeof modelFlags>>;

/** --quick overrides the sizes a user did not give explicitly. */
export function applyQuick<F extends ModelFlags>(f: F, argv: readonly string[], extra: Partial<Record<keyof F, number>> = {}): F {
  if (!f.quick) return f;
  const given = new Set(argv.filter((a) => a.startsWith('--')).map((a) => a.replace(/^--/, '').split('=')[0]));
  const quick: Record<string, number> = {
    hidden: 256,
    layers: 4,
    heads: 4,
    'kv-heads': 4,
    intermediate: 704,
    vocab: 4096,
    prompt: 128,
    runs: 2,
    warmup: 1,
    ...extra,
  };
  const out: Record<string, unknown> = { ...f };
  for (const [k, v] of Object.entries(quick)) if (!given.has(k)) out[k] = v;
  return out as F;
}

export function decoderConfig(f: ModelFlags): DecoderConfig {
  return {
    hiddenSize: f.hidden,
    numLayers: f.layers,
    numHeads: f.heads,
    numKvHeads: f['kv-heads'],
    intermediateSize: f.intermediate,
    vocabSize: f.vocab,
    maxPositions: f['max-positions'],
  };
}

export function sessionOptions(f: ModelFlags): SessionOptions {
  if (f.ep !== 'cpu' && f.ep !== 'cuda') throw new UsageError(`--ep must be cpu or cuda, got '${f.ep}'`);
  return { executionProvider: f.ep, ...(f.threads > 0 ? { intraOpThreads: f.threads } : {}) };
}

/** The intra-op thread count as reported: the number asked for, or ORT's default and the core count. */
export function threadsLine(f: ModelFlags): string {
  return f.threads > 0 ? String(f.threads) : `ORT default (one per physical core; ${cpus().length} logical cores here)`;
}

/** The settings every benchmark's JSON carries (the same facts as its settings block). */
export function settingsJson(f: ModelFlags, command: string): Record<string, unknown> {
  const cpu = cpus();
  return {
    command,
    date: new Date().toISOString(),
    machine: { cpu: cpu[0]?.model ?? 'unknown', logicalCores: cpu.length, memoryGiB: Math.round(totalmem() / 2 ** 30) },
    runtime: {
      node: process.version,
      onnxruntime: ort.env.versions.node ?? ort.env.versions.common,
      executionProvider: f.ep,
      threads: f.threads > 0 ? f.threads : 'ORT default',
    },
    malloc: mallocLine(),
    model: {
      form: 'builder Llama',
      dtype: 'float32',
      hidden: f.hidden,
      layers: f.layers,
      heads: f.heads,
      kvHeads: f['kv-heads'],
      intermediate: f.intermediate,
      vocab: f.vocab,
      weightSeed: f['weight-seed'],
    },
  };
}

// ---------------------------------------------------------------- memory

/** glibc malloc settings run.ts starts the benchmarks with (see its usage text). */
export const MALLOC_ENV = { MALLOC_MMAP_THRESHOLD_: '33554432', MALLOC_TRIM_THRESHOLD_: '4294967296' } as const;

function mallocLine(): string {
  const set = Object.keys(MALLOC_ENV)
    .filter((k) => process.env[k] !== undefined)
    .map((k) => `${k}=${process.env[k]}`);
  return set.length ? set.join(' ') : 'glibc defaults';
}

// ---------------------------------------------------------------- garbage collection

let gcFn: (() => void) | undefined;

/**
 * A full V8 collection, timed. Each run leaves the previous logits and KV tensors (hundreds of MB)
 * as garbage; freeing them inside a later timed run adds pauses unrelated to the model.
 */
export function collectGarbage(): number {
  if (!gcFn) {
    setFlagsFromString('--expose-gc');
    gcFn = runInNewContext('gc') as () => void;
  }
  const t0 = performance.now();
  gcFn();
  return performance.now() - t0;
}

// ---------------------------------------------------------------- statistics and output

import { median } from '../compiler/apps/benchmark/benchmark.js';
import { compile } from '../compiler/passes/compile.js';

export { median };

export function mean(xs: readonly number[]): number {
  return xs.reduce((a, b) => a + b, 0) / xs.length;
}

export const ms = (v: number, digits = 1) => `${v.toFixed(digits)} ms`;
export const ratio = (v: number) => `${v.toFixed(3)}x`;
export const pct = (v: number) => `${(100 * v).toFixed(1)}%`;
export const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(2)} MiB`;

export function table(header: string[], rows: (string | number)[][]): string {
  const line = (cells: (string | number)[]) => `| ${cells.map(String).join(' | ')} |`;
  return [line(header), line(header.map(() => '---')), ...rows.map(line)].join('\n');
}

export function environment(f: ModelFlags): string {
  const cpu = cpus();
  return [
    `date: ${new Date().toISOString()}`,
    `machine: ${cpu[0]?.model ?? 'unknown CPU'}, ${cpu.length} logical cores, ${(totalmem() / 2 ** 30).toFixed(0)} GiB`,
    `runtime: node ${process.version}, onnxruntime-node ${ort.env.versions.node ?? ort.env.versions.common}, ${f.ep === 'cuda' ? 'CUDA' : 'CPU'} execution provider, graph optimisation 'all', intra-op threads ${threadsLine(f)}`,
    `malloc: ${mallocLine()}`,
  ].join('\n');
}

export function modelLine(f: ModelFlags): string {
  return `model: builder Llama form, fp32, hidden ${f.hidden}, ${f.layers} layers, ${f.heads} heads, ${f['kv-heads']} kv heads, intermediate ${f.intermediate}, vocab ${f.vocab}, maxPositions ${f['max-positions']}, random weights seed ${f['weight-seed']} (external sidecar)`;
}

export const log = (msg: string) => process.stderr.write(`[bench] ${msg}\n`);

/** Deterministic token ids in [1, vocab). */
export function tokenIds(n: number, vocab: number, seed: number): number[] {
  let a = seed >>> 0;
  return Array.from({ length: n }, () => {
    a = (Math.imul(a, 1664525) + 1013904223) >>> 0;
    return 1 + (a % (vocab - 1));
  });
}

// ---------------------------------------------------------------- models

export class Workdir {
  readonly dir = mkdtempSync(join(tmpdir(), 'modc-bench-'));
  constructor(private readonly keep: boolean) {}
  path(name: string): string {
    return join(this.dir, name);
  }
  dispose(): void {
    if (this.keep) log(`kept ${this.dir}`);
    else rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Writes the builder model (weights in a sidecar next to it) and returns its path. */
export function buildModel(w: Workdir, f: ModelFlags): string {
  const path = w.path('original.onnx');
  const t0 = performance.now();
  writeLlamaModel(decoderConfig(f), { kind: 'external', path: 'weights.bin', sparse: false, seed: f['weight-seed'] }, path);
  log(`built ${path} in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  return path;
}

export type PlanChoice = Omit<PlanRequest, 'numLayers' | 'hiddenSize'>;

/**
 * Compiles `source` with the default MoD pipeline into the same folder (weights stay shared);
 * `logits: 'last'` adds the last-logits pass (`modc compile --logits last`).
 */
export function compileModel(source: string, out: string, choice: PlanChoice, logits: 'all' | 'last' = 'all'): { plan: RoutingPlan; ms: number } {
  const t0 = performance.now();
  const model = loadModel(source);
  const { plan } = compile(model, { ...choice, logits });
  saveModel(model, out);
  const took = performance.now() - t0;
  log(`compiled ${out} in ${(took / 1000).toFixed(1)} s`);
  return { plan, ms: took };
}

/** The original with only the last-logits pass (the lm_head for each row's last real token). */
export function lastLogitsModel(source: string, out: string): string {
  const model = loadModel(source);
  runPipeline(model, defaultRegistry().parsePipeline('last-logits,cleanup'));
  saveModel(model, out);
  log(`wrote ${out} (last-logits)`);
  return out;
}

// ---------------------------------------------------------------- unit-by-unit timing

/**
 * Feeds of one call of the original model: `ids` after a past of `past` tokens. The past K/V
 * are zeros: no op's cost depends on the values of the cache.
 */
export function originalFeeds(io: DecoderIo, ids: number[], past: number, batch = 1): Record<string, ort.Tensor> {
  const S = ids.length;
  const B = batch;
  const rows = <T>(row: T[]) => Array.from({ length: B }, () => row).flat();
  const feeds: Record<string, ort.Tensor> = { [io.inputIds.name]: typed(io.inputIds.dtype, rows(ids), [B, S]) };
  if (io.attentionMask) feeds[io.attentionMask.name] = typed(io.attentionMask.dtype, rows(Array(past + S).fill(1)), [B, past + S]);
  if (io.positionIds) feeds[io.positionIds.name] = typed(io.positionIds.dtype, rows(ids.map((_, i) => past + i)), [B, S]);
  for (const b of io.kv) {
    const dims = b.layout === 'combined-2BHTD' ? [2, B, b.numHeads, past, b.headSize] : [B, b.numHeads, past, b.headSize];
    const n = dims.reduce((x, y) => x * y, 1);
    const zeros = () => new ort.Tensor(b.dtype, b.dtype === 'float32' ? new Float32Array(n) : new Uint16Array(n), dims);
    feeds[b.pastKey] = zeros();
    if (b.pastValue) feeds[b.pastValue] = zeros();
  }
  return feeds;
}

export interface UnitTimes {
  prefix: number;
  layers: number[];
  suffix: number;
  /** prefix + layers + suffix */
  total: number;
}

/**
 * Cuts the original model into prefix, layer units and suffix (analyzeDecoder ->
 * splitFusedBoundaries -> extractDecoder), and times each unit on the same inputs as the full
 * model: the median of `runs` chained runs after `warmup` untimed ones.
 */
export async function timeUnits(
  modelPath: string,
  dir: string,
  feeds: Record<string, ort.Tensor>,
  runs: number,
  warmup: number,
  opts: SessionOptions,
): Promise<UnitTimes> {
  const model = loadModel(modelPath);
  const split = splitFusedBoundaries(model, analyzeDecoder(model));
  if (split.changed) log(`split-fused-boundaries: ${split.notes.length} node(s) split`);
  const decoder = extractDecoder(model, analyzeDecoder(model));
  const runner = await LayerByLayerRunner.create(decoder, dir, opts);
  try {
    const units = [runner.prefix, ...runner.layers, runner.suffix];
    const samples = units.map(() => [] as number[]);
    for (let r = 0; r < warmup + runs; r++) {
      const values = new Map(Object.entries(feeds));
      for (let i = 0; i < units.length; i++) {
        const t0 = performance.now();
        await runner.runUnit(units[i]!, values);
        if (r >= warmup) samples[i]!.push(performance.now() - t0);
      }
    }
    const med = samples.map(median);
    return { prefix: med[0]!, layers: med.slice(1, -1), suffix: med.at(-1)!, total: med.reduce((a, b) => a + b, 0) };
  } finally {
    await runner.release();
  }
}
