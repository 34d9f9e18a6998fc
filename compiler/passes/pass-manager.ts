/**
 * Passes and pipelines, after MLIR's pass manager: a pass is a named transformation with
 * declared options; a pipeline runs passes in order, verifies the IR after each, records time
 * and node-count changes, and can dump the model after any pass. The decoder analysis is an
 * analysis in MLIR's sense: computed once, handed to every pass that asks for it
 * (`ctx.structure()`), and recomputed only after a pass that changed the graph without declaring
 * that it preserves the structure.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ModcError, UsageError } from '../core/errors.js';
import { saveModel } from '../core/io/save.js';
import type { Model } from '../core/ir/model.js';
import { analyzeDecoder } from '../analysis/analyze.js';
import type { DecoderStructure } from '../analysis/types.js';
import { printModel } from '../core/ir/print.js';
import { assertValid } from '../core/ir/validate.js';

export type OptionValue = string | number | boolean;

/** A declared pass option: the CLI parses and checks it, the pass reads it typed. */
export interface OptionSpec {
  name: string;
  type: 'number' | 'string' | 'boolean';
  description: string;
  default?: OptionValue;
}

export interface PassContext {
  /** Progress and notes for the user (stderr in the CLI). */
  log(message: string): void;
  /** The decoder analysis of the model as it is now (cached across passes). */
  structure(): DecoderStructure;
}

/** Analyses a pass can keep valid while it changes the model. */
export type PreservedAnalysis = 'structure';

export interface PassResult {
  /** Whether the pass changed the model. */
  changed: boolean;
  /** Human-readable notes: what was done, what was skipped and why. */
  notes?: string[];
}

export interface Pass<O extends Record<string, OptionValue> = Record<string, OptionValue>> {
  name: string;
  description: string;
  options?: OptionSpec[];
  /**
   * Analyses still valid after this pass changed the model: 'structure' for a pass that only
   * writes metadata or adds nodes that read the stream without rewiring what the analysis found.
   */
  preserves?: readonly PreservedAnalysis[];
  run(model: Model, options: O, ctx: PassContext): PassResult;
}

/** A pass plus the options chosen for this run. */
export interface PipelineStep {
  pass: Pass;
  options: Record<string, OptionValue>;
}

/** A step of `pass` with its typed options. */
export function stepOf<O extends Record<string, OptionValue>>(pass: Pass<O>, options: O): PipelineStep {
  return { pass: pass as unknown as Pass, options };
}

export interface PassRecord {
  pass: string;
  ms: number;
  nodesBefore: number;
  nodesAfter: number;
  changed: boolean;
  notes: string[];
}

export interface PipelineOptions {
  /** Verify the IR after each pass (default true). */
  verify?: boolean;
  /** Pass names after which to dump the model (`*` for all). */
  dumpAfter?: string[];
  /** Folder for dumps: `<NN>-<pass>.onnx` and `.txt`. */
  dumpDir?: string;
  log?: (message: string) => void;
  /** The caller's analysis of the model as it is before the first pass (saves analysing it again). */
  structure?: DecoderStructure;
}

export class PassRegistry {
  private readonly passes = new Map<string, Pass>();

  register<O extends Record<string, OptionValue>>(pass: Pass<O>): this {
    if (this.passes.has(pass.name)) throw new Error(`pass ${pass.name} registered twice`);
    this.passes.set(pass.name, pass as unknown as Pass);
    return this;
  }

  get(name: string): Pass {
    const p = this.passes.get(name);
    if (!p) throw new UsageError(`unknown pass '${name}' (known: ${[...this.passes.keys()].join(', ')})`);
    return p;
  }

  list(): Pass[] {
    return [...this.passes.values()];
  }

  /**
   * Parses `name,name{opt=value;opt=value},...` into steps; `none` is the empty pipeline.
   * Options are checked against each pass's declared specs.
   */
  parsePipeline(text: string): PipelineStep[] {
    const trimmed = text.trim();
    if (trimmed === '' || trimmed === 'none') return [];
    const steps: PipelineStep[] = [];
    const re = /\s*([A-Za-z0-9_-]+)(?:\{([^}]*)\})?\s*(?:,|$)/y;
    let m: RegExpExecArray | null;
    let at = 0;
    while (at < trimmed.length && ((re.lastIndex = at), (m = re.exec(trimmed)))) {
      at = re.lastIndex;
      const pass = this.get(m[1]!);
      steps.push({ pass, options: parseOptions(pass, m[2] ?? '') });
    }
    if (at < trimmed.length) throw new UsageError(`cannot parse --passes near '${trimmed.slice(at)}'`);
    return steps;
  }
}

function parseOptions(pass: Pass, text: string): Record<string, OptionValue> {
  const out: Record<string, OptionValue> = {};
  for (const spec of pass.options ?? []) if (spec.default !== undefined) out[spec.name] = spec.default;
  for (const part of text
    .split(';')
    .map((s) => s.trim())
    .filter(Boolean)) {
    const [key, raw = 'true'] = part.split('=', 2).map((s) => s.trim()) as [string, string?];
    const spec = pass.options?.find((o) => o.name === key);
    if (!spec)
      throw new UsageError(
        `pass ${pass.name} has no option '${key}'${pass.options?.length ? ` (options: ${pass.options.map((o) => o.name).join(', ')})` : ''}`,
      );
    out[key] = coerce(pass.name, spec, raw);
  }
  return out;
}

export function coerce(passName: string, spec: OptionSpec, raw: string): OptionValue {
  switch (spec.type) {
    case 'number': {
      const n = Number(raw);
      if (raw === '' || !Number.isFinite(n)) throw new UsageError(`pass ${passName}: option ${spec.name} must be a number, got '${raw}'`);
      return n;
    }
    case 'boolean':
      if (raw !== 'true' && raw !== 'false') throw new UsageError(`pass ${passName}: option ${spec.name} must be true or false, got '${raw}'`);
      return raw === 'true';
    default:
      return raw;
  }
}

function nodeCount(model: Model): number {
  let n = 0;
  for (const _ of model.allNodes()) n++;
  return n;
}

/** Runs the steps in order; stops at the first pass that fails or leaves invalid IR. */
export function runPipeline(model: Model, steps: readonly PipelineStep[], opts: PipelineOptions = {}): PassRecord[] {
  const log = opts.log ?? (() => {});
  const dumpAll = opts.dumpAfter?.includes('*') ?? false;
  const notRun = (opts.dumpAfter ?? []).filter((name) => name !== '*' && !steps.some((st) => st.pass.name === name));
  if (notRun.length)
    throw new UsageError(`--dump-after ${notRun.join(', ')}: no such pass in this pipeline (${steps.map((st) => st.pass.name).join(', ')}, or *)`);
  const records: PassRecord[] = [];
  let structure = opts.structure;
  const ctx: PassContext = { log, structure: () => (structure ??= analyzeDecoder(model)) };
  steps.forEach((step, i) => {
    const nodesBefore = nodeCount(model);
    const t0 = performance.now();
    log(`[${i + 1}/${steps.length}] ${step.pass.name}`);
    let result: PassResult;
    try {
      result = step.pass.run(model, step.options, ctx);
    } catch (e) {
      if (e instanceof ModcError) throw new ModcError(`pass ${step.pass.name}: ${e.message}`, e.exitCode);
      throw e;
    }
    if (result.changed && !step.pass.preserves?.includes('structure')) structure = undefined;
    if (opts.verify !== false) assertValid(model, `IR after pass ${step.pass.name}`);
    const ms = performance.now() - t0;
    records.push({ pass: step.pass.name, ms, nodesBefore, nodesAfter: nodeCount(model), changed: result.changed, notes: result.notes ?? [] });
    if (dumpAll || opts.dumpAfter?.includes(step.pass.name)) {
      const dir = opts.dumpDir ?? '.';
      mkdirSync(dir, { recursive: true });
      const base = join(dir, `${String(i + 1).padStart(2, '0')}-${step.pass.name}`);
      writeFileSync(`${base}.txt`, printModel(model) + '\n');
      saveModel(model, `${base}.onnx`);
      log(`  dumped ${base}.onnx and .txt`);
    }
  });
  return records;
}
