/**
 * One fuzz case, start to end: mutate a fixture, write it to a folder, then run it through the
 * library as the CLI would (load -> inspect -> analyse -> compile or round trip -> save -> load
 * the output back) and classify what happened; for a sample, load input and output in ONNX
 * Runtime, and for a sample of those whose input loads, check that compiling keeps the model's
 * meaning (differential.ts). Runs inside a child process (see pool.ts), which turns a case that
 * never finishes into a "hang".
 */
import { mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { ModcError } from '../../compiler/core/errors.js';
import { loadModel } from '../../compiler/core/io/load.js';
import { saveModel } from '../../compiler/core/io/save.js';
import { runPipeline, type PipelineStep } from '../../compiler/passes/pass-manager.js';
import { readRoutingMetadata } from '../../compiler/metadata/routing-metadata.js';
import { planRouting, type RoutingMode } from '../../compiler/routing/routing-plan.js';
import { summarizeModel } from '../../compiler/core/ir/model-summary.js';
import { analyzeDecoder } from '../../compiler/analysis/analyze.js';
import { ort } from '../../compiler/runtime/ort.js';
import { defaultRegistry, modPipeline } from '../../compiler/passes/pipeline.js';
import { differential } from './differential.js';
import { caseSeed, irEdit, mutate, Rng } from './mutate.js';

export type OutcomeKind = 'refused' | 'accepted' | 'crash' | 'hang' | 'multi-line' | 'ort-rejected' | 'unloadable-output' | 'mismatch';

/** Outcomes that are bugs. */
export const FAILURES: readonly OutcomeKind[] = ['crash', 'hang', 'multi-line', 'ort-rejected', 'unloadable-output', 'mismatch'];

export interface CaseSpec {
  /** Seed model: a folder holding model.onnx and any sidecar files. */
  fixture: string;
  seed: number;
  index: number;
  /** Load the input and (if it loads) the output in ONNX Runtime. */
  ort: boolean;
  /** With `ort`, when the input loads: the differential check (differential.ts) on the input. */
  diff?: boolean;
  /** Scratch folder for this case; removed afterwards unless the case failed. */
  work: string;
}

export interface Outcome {
  kind: OutcomeKind;
  /** The stage that refused or failed (load, summary, routing-metadata, analyse, plan, passes, save, reload, ort). */
  stage: string;
  message: string;
  /** What was mutated and which action ran. */
  log: string[];
  /** For ORT checks: whether the mutated input loaded in ONNX Runtime. */
  inputLoadsInOrt?: boolean;
  /** For differential checks: 'passed (...)' or 'skipped: why' (a mismatch is the outcome itself). */
  differential?: string;
}

const seedFiles = new Map<string, { bytes: Uint8Array; sidecars: Map<string, Uint8Array> }>();

function readSeed(dir: string): { bytes: Uint8Array; sidecars: Map<string, Uint8Array> } {
  let s = seedFiles.get(dir);
  if (!s) {
    const sidecars = new Map<string, Uint8Array>();
    const walk = (d: string) => {
      for (const e of readdirSync(d)) {
        const p = join(d, e);
        if (statSync(p).isDirectory()) walk(p);
        else if (e !== 'model.onnx' && !e.endsWith('.json') && !e.endsWith('.md')) sidecars.set(relative(dir, p), readFileSync(p));
      }
    };
    walk(dir);
    s = { bytes: readFileSync(join(dir, 'model.onnx')), sidecars };
    seedFiles.set(dir, s);
  }
  return s;
}

/** Writes the mutant into `dir` (model.onnx plus its sidecars). */
export function writeMutant(dir: string, bytes: Uint8Array, files: Map<string, Uint8Array>): string {
  mkdirSync(dir, { recursive: true });
  for (const [name, data] of files) {
    const p = join(dir, name);
    mkdirSync(dirname(p), { recursive: true });
    writeFileSync(p, data);
  }
  const path = join(dir, 'model.onnx');
  writeFileSync(path, bytes);
  return path;
}

/** Whether a message is fit for one line of a terminal. */
export function isOneLine(message: string): boolean {
  // eslint-disable-next-line no-control-regex
  return !/[\u0000-\u0008\u000a-\u001f\u007f\u2028\u2029]/.test(message);
}

/** The stage a case is in; `onEnter` hears each change (the fuzz worker tells its parent). */
class Stage {
  private current = 'load';
  constructor(private readonly onEnter: (name: string) => void = () => {}) {}
  get name(): string {
    return this.current;
  }
  set name(next: string) {
    this.current = next;
    this.onEnter(next);
  }
}

/**
 * The stage in which ONNX Runtime loads the mutated input, before modc's output is checked. A
 * case that runs out of time or memory there is ONNX Runtime's trouble with the input, not a
 * modc failure (an int64 constant changed so that ORT's session setup allocates without bound).
 */
export const ORT_INPUT_STAGE = 'ort-input';

/** Builds a case's mutant and writes it to `<work>/in`; returns the input path and the log. */
export function prepareCase(spec: CaseSpec): { input: string; rng: Rng; log: string[] } {
  const rng = new Rng(caseSeed(spec.seed, spec.index));
  const seed = readSeed(spec.fixture);
  const m = mutate(seed.bytes, seed.sidecars, rng);
  const input = writeMutant(join(spec.work, 'in'), m.bytes, m.files);
  return { input, rng, log: [`fixture ${spec.fixture}`, ...m.log] };
}

export async function runCase(spec: CaseSpec, onStage?: (name: string) => void): Promise<Outcome> {
  const { input, rng, log } = prepareCase(spec);
  const stage = new Stage(onStage);
  const output = join(spec.work, 'out', 'model.onnx');
  try {
    const outcome = await runStages(input, output, rng, log, stage, spec.ort, spec.diff ? join(spec.work, 'diff') : null);
    return outcome;
  } catch (e) {
    if (e instanceof ModcError) {
      return { kind: isOneLine(e.message) ? 'refused' : 'multi-line', stage: stage.name, message: e.message, log };
    }
    const err = e as Error;
    return { kind: 'crash', stage: stage.name, message: `${err?.name ?? 'Error'}: ${err?.message ?? String(e)}\n${err?.stack ?? ''}`, log };
  }
}

async function runStages(input: string, output: string, rng: Rng, log: string[], stage: Stage, checkOrt: boolean, diffDir: string | null): Promise<Outcome> {
  stage.name = 'load';
  const model = loadModel(input);
  stage.name = 'summary';
  summarizeModel(model);
  stage.name = 'routing-metadata';
  readRoutingMetadata(model);
  if (rng.chance(0.12)) {
    const edit = irEdit(model, rng);
    if (edit) log.push(edit);
  }
  const action = rng.next();
  let steps: PipelineStep[];
  if (action < 0.25) {
    log.push('action: --passes none');
    steps = [];
  } else if (action < 0.35) {
    const list = rng.pick([
      'inline-modc-ops',
      'cleanup',
      'lift-constants',
      'split-fused-boundaries',
      'cleanup,lift-constants',
      'lift-constants,inline-modc-ops',
    ])!;
    log.push(`action: --passes ${list}`);
    steps = defaultRegistry().parsePipeline(list);
  } else {
    stage.name = 'analyse';
    const s = analyzeDecoder(model);
    stage.name = 'plan';
    const mode: RoutingMode = rng.chance(0.5) ? 'threshold' : 'topk';
    const gated = rng.chance(0.5);
    const inlineOps = rng.chance(0.3);
    const routers = rng.chance(0.5) ? { kind: 'all-pass' as const } : { kind: 'random' as const, seed: rng.int(100) };
    const layers = rng.pick([undefined, 'all', 'even', 'odd', '0', '1'])!;
    log.push(`action: compile ${mode} ${gated ? 'gated' : 'ungated'}${inlineOps ? ' --inline-ops' : ''} ${routers.kind} layers=${layers ?? 'default'}`);
    const plan = planRouting({
      numLayers: s.layers.length,
      hiddenSize: s.hiddenSize,
      routers,
      mode,
      gated,
      layers: layers !== undefined && s.layers.length > 1 ? layers : undefined,
    });
    steps = modPipeline({ plan, inlineOps });
  }
  stage.name = 'passes';
  runPipeline(model, steps, { verify: true });
  stage.name = 'save';
  saveModel(model, output);
  stage.name = 'reload';
  try {
    const back = loadModel(output);
    summarizeModel(back);
    readRoutingMetadata(back);
  } catch (e) {
    return { kind: 'unloadable-output', stage: 'reload', message: (e as Error).message, log };
  }
  if (!checkOrt) return { kind: 'accepted', stage: 'done', message: '', log };
  stage.name = 'ort';
  const tryLoad = async (path: string): Promise<string | null> => {
    try {
      const s = await ort.InferenceSession.create(path, { executionProviders: ['cpu'], graphOptimizationLevel: 'disabled', intraOpNumThreads: 1 });
      await s.release();
      return null;
    } catch (e) {
      return ((e as Error).message ?? String(e)).split('\n')[0]!;
    }
  };
  stage.name = ORT_INPUT_STAGE;
  const inErr = await tryLoad(input);
  stage.name = 'ort';
  if (inErr !== null) return { kind: 'accepted', stage: 'done', message: `input does not load in ORT: ${inErr}`, log, inputLoadsInOrt: false };
  const outErr = await tryLoad(output);
  if (outErr !== null) return { kind: 'ort-rejected', stage: 'ort', message: outErr, log, inputLoadsInOrt: true };
  if (!diffDir) return { kind: 'accepted', stage: 'done', message: '', log, inputLoadsInOrt: true };
  stage.name = 'differential';
  const d = await differential(input, diffDir, rng, { onStage: (name) => (stage.name = name) });
  if (d.kind === 'mismatch') return { kind: 'mismatch', stage: 'differential', message: d.message, log, inputLoadsInOrt: true };
  const differentialNote = d.kind === 'passed' ? `passed (${d.what})` : `skipped: ${d.note}`;
  return { kind: 'accepted', stage: 'done', message: '', log, inputLoadsInOrt: true, differential: differentialNote };
}

/** Removes a case's scratch folder. */
export function cleanCase(work: string): void {
  rmSync(work, { recursive: true, force: true });
}
