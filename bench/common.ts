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
import { extractDecoder, extractUnits } from '../compiler/analysis/extract.js';
import { subLayersOf } from '../compiler/analysis/sub-layers.js';
import type { Node } from '../compiler/core/ir/graph.js';
import { LayerByLayerRunner, type LoadedUnit, loadUnit, runUnit } from '../compiler/runtime/layer-runner.js';
import { UsageError } from '../compiler/core/errors.js';
import type { CliOption } from '../compiler/cli/command.js';
import { intFlag, numberFlag, parseOptions, stringFlag } from '../compiler/cli/shared.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { runPipeline } from '../compiler/passes/pass-manager.js';
import { type RoutingPlan } from '../compiler/routing/routing-plan.js';
import { type DecoderIo } from '../compiler/metadata/decoder-io.js';
import { ort, type SessionOptions } from '../compiler/runtime/ort.js';
import { typed } from '../compiler/runtime/session.js';
import { type DecoderConfig, writeFusedGpt2Model, writeGenaiModel, writeLlamaModel } from '../fixtures/builder/index.js';
import { buildFormDecoder } from '../fixtures/builder/forms.js';
import { splitFusedBoundaries } from '../compiler/passes/split-fused-boundaries.js';
import { defaultRegistry } from '../compiler/passes/pipeline.js';

// ---------------------------------------------------------------- flags

export interface FlagSpec {
  kind: 'int' | 'float' | 'bool' | 'string';
  default: number | boolean | string;
  help: string;
  /** Smallest value an int or float flag takes (default: 0 for int, none for float). */
  min?: number;
}

export type FlagSpecs = Record<string, FlagSpec>;
export type Flags<S extends FlagSpecs> = { [K in keyof S]: S[K]['kind'] extends 'bool' ? boolean : S[K]['kind'] extends 'string' ? string : number };

/**
 * node:util parseArgs with the CLI's option helpers (compiler/cli/shared.ts): `--name value`,
 * `--name=value`, negative numbers as values, `--flag` / `--no-flag` for booleans; an unknown
 * flag, a missing value or a number out of range is a usage error naming the flag.
 */
export function parseFlags<S extends FlagSpecs>(argv: readonly string[], specs: S): Flags<S> {
  const options = Object.fromEntries(
    Object.entries(specs).map(([k, s]) => [k, { type: s.kind === 'bool' ? 'boolean' : 'string', help: s.help } satisfies CliOption]),
  );
  const { values } = parseOptions(argv, options, { allowPositionals: false, allowNegative: true, help: '--help' });
  const out: Record<string, number | boolean | string> = {};
  for (const [k, s] of Object.entries(specs)) {
    if (s.kind === 'bool') out[k] = typeof values[k] === 'boolean' ? (values[k] as boolean) : (s.default as boolean);
    else if (s.kind === 'string') out[k] = stringFlag(values, k) ?? (s.default as string);
    else if (s.kind === 'int') out[k] = intFlag(values, k, s.default as number, s.min ?? 0);
    else {
      const v = numberFlag(values, k) ?? (s.default as number);
      if (s.min !== undefined && !(v >= s.min)) throw new UsageError(`--${k} must be a number >= ${s.min}`);
      out[k] = v;
    }
  }
  return out as Flags<S>;
}

/** Flags given on the command line (so --quick does not override them). */
export function givenFlags(argv: readonly string[]): Set<string> {
  return new Set(argv.filter((a) => a.startsWith('--')).map((a) => a.replace(/^--(no-)?/, '').split('=')[0]!));
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
    form: { kind: 'string', default: 'llama', help: `decoder form the fixture builder writes: ${FORMS.join(', ')} (see "Forms" in bench/README.md)` },
    hidden: { kind: 'int', default: 1024, help: 'hidden size', min: 1 },
    layers: { kind: 'int', default: 8, help: 'decoder layers', min: 1 },
    heads: { kind: 'int', default: 16, help: 'attention heads', min: 1 },
    'kv-heads': { kind: 'int', default: 16, help: 'key/value heads (GQA when < heads; the llama, gqa and standard forms)', min: 1 },
    intermediate: { kind: 'int', default: 2816, help: 'MLP intermediate size', min: 1 },
    vocab: { kind: 'int', default: 32000, help: 'vocabulary size', min: 2 },
    'max-positions': {
      kind: 'int',
      default: 2048,
      help: 'rows of the position tables (gqa, mha, standard: rotary caches; gpt2: wpe), raised to the context the benchmark needs; the llama form computes RoPE in-graph',
      min: 1,
    },
    prompt: { kind: 'int', default: defaults.prompt, help: 'prompt tokens (batch 1)', min: 1 },
    runs: { kind: 'int', default: defaults.runs, help: 'timed runs (median reported)', min: 1 },
    warmup: { kind: 'int', default: defaults.warmup, help: 'untimed warm-up runs' },
    capacity: { kind: 'float', default: 0.5, help: 'top-k capacity of the converted layers' },
    'router-seed': { kind: 'int', default: 1, help: 'seed of the random routers' },
    'weight-seed': { kind: 'int', default: 7, help: 'seed of the model weights' },
    threads: { kind: 'int', default: 0, help: 'ORT intra-op threads (0: ORT default, one per physical core)' },
    spinning: {
      kind: 'bool',
      default: false,
      help: "let idle ORT worker threads spin (ORT's default); off, the default here, sets session.intra_op / inter_op.allow_spinning = 0",
    },
    ep: { kind: 'string', default: 'cpu', help: 'execution provider: cpu or cuda (see docs/serving.md, "CUDA")' },
    json: { kind: 'bool', default: false, help: 'print the results as one JSON object on stdout instead of Markdown tables' },
    gc: { kind: 'bool', default: true, help: 'collect garbage (old logits and KV tensors) before each timed run, outside the timing; --no-gc leaves it to V8' },
    processes: {
      kind: 'int',
      default: 3,
      help: "fresh processes each pair is timed in, one after another, their samples pooled (--runs per process): a session's speed varies with where its memory lands, from one process to the next",
      min: 1,
    },
    keep: { kind: 'bool', default: false, help: 'keep the temp folder with the models' },
    'default-malloc': { kind: 'bool', default: false, help: 'keep glibc malloc defaults instead of re-running with MALLOC_ENV (see run.js --help)' },
    quick: { kind: 'bool', default: false, help: 'small sizes for a smoke run (hidden 256, 4 layers, vocab 4096, prompt 128, 2 runs)' },
  } satisfies FlagSpecs;
}

export type ModelFlags = Flags<ReturnType<typeof modelFlags>>;

/** The decoder forms the benchmarks build (fixtures/builder). */
export const FORMS = ['llama', 'gqa', 'mha', 'standard', 'gpt2'] as const;
export type Form = (typeof FORMS)[number];

const FORM_LINES: Record<Form, string> = {
  llama: 'builder Llama form (standard ops, unfused attention, Concat caches), fp32',
  gqa: 'builder GQA form (com.microsoft GroupQueryAttention, do_rotary, seqlens_k from the mask), fp32',
  mha: "builder GenAI form (onnxruntime-genai's MultiHeadAttention, RotaryEmbedding, SkipSimplifiedLayerNormalization), fp16",
  standard: 'builder standard form (opset-23 Attention with past/present, RotaryEmbedding-23, RMSNormalization-23), fp32',
  gpt2: "builder fused GPT-2 form (ORT transformers optimizer's Attention with combined past, EmbedLayerNormalization, SkipLayerNormalization, FastGelu), fp32",
};

export function formOf(f: { form: string }): Form {
  if (!(FORMS as readonly string[]).includes(f.form)) throw new UsageError(`--form must be one of ${FORMS.join(', ')}, got '${f.form}'`);
  return f.form as Form;
}

/** What a converted layer routes: --granularity. */
export const GRANULARITIES = ['block', 'attention', 'mlp'] as const;
export type BenchGranularity = (typeof GRANULARITIES)[number];

export function granularityOf(f: { granularity: string }): BenchGranularity {
  if (!(GRANULARITIES as readonly string[]).includes(f.granularity))
    throw new UsageError(`--granularity must be one of ${GRANULARITIES.join(', ')}, got '${f.granularity}'`);
  return f.granularity as BenchGranularity;
}

/** --quick overrides the sizes a user did not give explicitly. */
export function applyQuick<F extends ModelFlags>(f: F, argv: readonly string[], extra: Partial<Record<keyof F, number>> = {}): F {
  if (!f.quick) return f;
  const given = givenFlags(argv);
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
    processes: 1,
    ...extra,
  };
  const out: Record<string, unknown> = { ...f };
  for (const [k, v] of Object.entries(quick)) if (!given.has(k)) out[k] = v;
  return out as F;
}

/** The builder config; `positions`: the longest context the benchmark runs (position tables get at least that many rows). */
export function decoderConfig(f: ModelFlags, positions = 0): DecoderConfig {
  if (f.hidden % f.heads !== 0) throw new UsageError(`--hidden ${f.hidden} is not a multiple of --heads ${f.heads}`);
  if (f.heads % f['kv-heads'] !== 0) throw new UsageError(`--heads ${f.heads} is not a multiple of --kv-heads ${f['kv-heads']}`);
  return {
    hiddenSize: f.hidden,
    numLayers: f.layers,
    numHeads: f.heads,
    numKvHeads: f['kv-heads'],
    intermediateSize: f.intermediate,
    vocabSize: f.vocab,
    maxPositions: Math.max(f['max-positions'], positions),
  };
}

/** Session options of every timed session: the EP, the thread count, and idle workers that block instead of spinning. */
export function sessionOptions(f: ModelFlags): SessionOptions {
  if (f.ep !== 'cpu' && f.ep !== 'cuda') throw new UsageError(`--ep must be cpu or cuda, got '${f.ep}'`);
  return { executionProvider: f.ep, ...(f.threads > 0 ? { intraOpThreads: f.threads } : {}), allowSpinning: f.spinning };
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
      spinning: f.spinning ? 'ORT default' : 'off',
    },
    malloc: mallocSettings(),
    model: {
      form: formOf(f),
      dtype: formOf(f) === 'mha' ? 'float16' : 'float32',
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

/** glibc malloc settings run.ts starts the benchmarks with (the same as `modc bench`'s; see run.js --help). */
export { MALLOC_ENV, mallocSettings };

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

import { MALLOC_ENV, mallocSettings, median } from '../compiler/apps/benchmark/benchmark.js';
import { compile, type CompileReport, type RoutingRequest } from '../compiler/passes/compile.js';

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
    `runtime: node ${process.version}, onnxruntime-node ${ort.env.versions.node ?? ort.env.versions.common}, ${f.ep === 'cuda' ? 'CUDA' : 'CPU'} execution provider, graph optimisation 'all', intra-op threads ${threadsLine(f)}, idle workers ${f.spinning ? "spin (ORT's default)" : 'block (allow_spinning 0)'}`,
    `malloc: ${mallocSettings()}`,
  ].join('\n');
}

export function modelLine(f: ModelFlags): string {
  return `model: ${FORM_LINES[formOf(f)]}, hidden ${f.hidden}, ${f.layers} layers, ${f.heads} heads, ${f['kv-heads']} kv heads, intermediate ${f.intermediate}, vocab ${f.vocab}, random non-zero weights seed ${f['weight-seed']} (sidecar weights.bin)`;
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

/**
 * Writes the builder model of `--form` as `original.onnx` with its seeded random (non-zero)
 * weights in the sidecar `weights.bin` next to it, and returns its path. `positions`: the
 * longest context the benchmark runs (the position tables of the table forms get that many rows).
 */
export function buildModel(w: Workdir, f: ModelFlags, positions = 0): string {
  const path = w.path('original.onnx');
  const form = formOf(f);
  const cfg = decoderConfig(f, positions);
  const seed = f['weight-seed'];
  const sidecar = { kind: 'external', path: 'weights.bin', sparse: false, seed } as const;
  const t0 = performance.now();
  if ((form === 'mha' || form === 'gpt2') && f.heads !== f['kv-heads']) throw new UsageError(`--form ${form} needs --kv-heads equal to --heads (${f.heads})`);
  if (form === 'llama') writeLlamaModel(cfg, sidecar, path);
  else if (form === 'mha') writeGenaiModel(cfg, sidecar, path);
  else if (form === 'gpt2') writeFusedGpt2Model(cfg, sidecar, path);
  else saveModel(buildFormDecoder(cfg, seed, { attention: form }), path, { externalizeThreshold: 1024, externalDataName: 'weights.bin' });
  log(`built ${path} (${form} form) in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  return path;
}

/** How to route a compile: the plan's choices (routers, mode, capacity, ...) or a plan made already. */
export type PlanChoice = RoutingRequest;

/**
 * Compiles `source` with the default MoD pipeline into the same folder (weights stay shared);
 * `logits: 'last'` adds the last-logits pass (`modc compile --logits last`).
 */
export function compileModel(
  source: string,
  out: string,
  choice: PlanChoice,
  logits: 'all' | 'last' = 'all',
): { plan: RoutingPlan; report: CompileReport; ms: number } {
  const t0 = performance.now();
  const model = loadModel(source);
  const { plan, report } = compile(model, { ...choice, logits });
  saveModel(model, out);
  const took = performance.now() - t0;
  log(`compiled ${out} in ${(took / 1000).toFixed(1)} s`);
  return { plan, report, ms: took };
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
  /**
   * With `parts`: per layer, its attention part's time and the rest of the layer's (the MLP part
   * and the residual adds), each timed as a unit of its own; null for a layer with no sub-layer
   * boundary.
   */
  parts?: ({ attention: number; mlp: number } | null)[];
}

/**
 * Cuts the original model into prefix, layer units and suffix (analyzeDecoder ->
 * splitFusedBoundaries -> extractDecoder), and times each unit on the same inputs as the full
 * model: the median of `runs` chained runs after `warmup` untimed ones. With `parts`, times the
 * same chain again with each layer cut in two, its attention part and the rest.
 */
export async function timeUnits(
  modelPath: string,
  dir: string,
  feeds: Record<string, ort.Tensor>,
  runs: number,
  warmup: number,
  opts: SessionOptions,
  { parts = false }: { parts?: boolean } = {},
): Promise<UnitTimes> {
  const model = loadModel(modelPath);
  const split = splitFusedBoundaries(model, analyzeDecoder(model));
  if (split.changed) log(`split-fused-boundaries: ${split.notes.length} node(s) split`);
  const s = analyzeDecoder(model);
  const decoder = extractDecoder(model, s);
  const runner = await LayerByLayerRunner.create(decoder, dir, opts);
  let med: number[];
  try {
    med = (await timeChain([runner.prefix, ...runner.layers, runner.suffix], feeds, runs, warmup)).map(median);
  } finally {
    await runner.release();
  }
  const times: UnitTimes = { prefix: med[0]!, layers: med.slice(1, -1), suffix: med.at(-1)!, total: med.reduce((a, b) => a + b, 0) };
  if (!parts) return times;
  // Each layer in two: its attention part's nodes, then the rest (the MLP part and the adds).
  const outputs = new Set(model.graph.outputs);
  const groups: { name: string; nodes: Node[] }[] = [{ name: 'prefix', nodes: s.prefixNodes }];
  const attentionUnit = s.layers.map((l) => {
    const sub = subLayersOf(l, outputs);
    if ('reason' in sub) {
      groups.push({ name: `layer.${l.index}`, nodes: l.nodes });
      return null;
    }
    const attention = new Set(sub.attention.nodes);
    groups.push({ name: `layer.${l.index}.attention`, nodes: l.nodes.filter((n) => attention.has(n)) });
    groups.push({ name: `layer.${l.index}.rest`, nodes: l.nodes.filter((n) => !attention.has(n)) });
    return groups.length - 2;
  });
  groups.push({ name: 'suffix', nodes: s.suffixNodes });
  const loaded: LoadedUnit[] = [];
  try {
    for (const u of extractUnits(model, groups)) loaded.push(await loadUnit(u, join(dir, 'parts'), opts));
    const partMed = (await timeChain(loaded, feeds, runs, warmup)).map(median);
    times.parts = attentionUnit.map((i) => (i === null ? null : { attention: partMed[i]!, mlp: partMed[i + 1]! }));
  } finally {
    for (const u of loaded) await u.session.release();
  }
  return times;
}

/** Per unit, its times over `runs` chained runs of all units on `feeds`, after `warmup` untimed ones. */
async function timeChain(units: readonly LoadedUnit[], feeds: Record<string, ort.Tensor>, runs: number, warmup: number): Promise<number[][]> {
  const samples = units.map(() => [] as number[]);
  for (let r = 0; r < warmup + runs; r++) {
    const values = new Map(Object.entries(feeds));
    for (let i = 0; i < units.length; i++) {
      const t0 = performance.now();
      await runUnit(units[i]!, values);
      if (r >= warmup) samples[i]!.push(performance.now() - t0);
    }
  }
  return samples;
}
