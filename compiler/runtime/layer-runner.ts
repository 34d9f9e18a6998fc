/**
 * Running an extracted decoder unit by unit with onnxruntime-node: prefix, each layer, suffix,
 * passing tensors by value name. With the same feeds it returns what the original model
 * returns (logits and every present), which is what makes it the base of the MoD reference
 * executor: a caller can run any layer on its own, on any subset of tokens, between the others.
 */
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { ModcError } from '../core/errors.js';
import { saveModel } from '../core/io/save.js';
import { createSession, ort, type SessionOptions } from './ort.js';
import type { ExtractedDecoder, RunnableUnit } from '../analysis/extract.js';

export type TensorMap = Record<string, ort.Tensor>;

/** A unit with its session. */
export interface LoadedUnit {
  unit: RunnableUnit;
  session: ort.InferenceSession;
  path: string;
}

/** Saves a unit as `dir/NAME.onnx` and opens a session on it. */
export async function loadUnit(unit: RunnableUnit, dir: string, opts: SessionOptions = {}): Promise<LoadedUnit> {
  mkdirSync(dir, { recursive: true });
  const path = join(dir, `${unit.name}.onnx`);
  saveModel(unit.model, path);
  return { unit, session: await createSession(path, opts), path };
}

/** Runs one unit, reading its inputs from `values` and adding its outputs there. */
export async function runUnit(loaded: LoadedUnit, values: Map<string, ort.Tensor>): Promise<void> {
  const feeds: TensorMap = {};
  for (const name of loaded.unit.inputs) {
    const t = values.get(name);
    if (!t) throw new ModcError(`unit ${loaded.unit.name} needs ${name}, which neither the feeds nor an earlier unit provide`);
    feeds[name] = t;
  }
  let out: ort.InferenceSession.OnnxValueMapType;
  try {
    out = await loaded.session.run(feeds);
  } catch (e) {
    throw new ModcError(`onnxruntime failed running unit ${loaded.unit.name} (${loaded.path}): ${(e as Error).message.split('\n')[0]}`);
  }
  for (const name of loaded.unit.outputs) values.set(name, out[name] as ort.Tensor);
}

export class LayerByLayerRunner {
  private constructor(
    readonly decoder: ExtractedDecoder,
    readonly prefix: LoadedUnit,
    readonly layers: LoadedUnit[],
    readonly suffix: LoadedUnit,
  ) {}

  /** Saves every unit under `dir` (weights of external-data models are linked, not copied) and opens sessions. */
  static async create(decoder: ExtractedDecoder, dir: string, opts: SessionOptions = {}): Promise<LayerByLayerRunner> {
    const prefix = await loadUnit(decoder.prefix, dir, opts);
    const layers: LoadedUnit[] = [];
    for (const l of decoder.layers) layers.push(await loadUnit(l, dir, opts));
    return new LayerByLayerRunner(decoder, prefix, layers, await loadUnit(decoder.suffix, dir, opts));
  }

  /** Runs one unit, reading its inputs from `values` and adding its outputs there. */
  runUnit(loaded: LoadedUnit, values: Map<string, ort.Tensor>): Promise<void> {
    return runUnit(loaded, values);
  }

  /** Prefix, layers in order, suffix; returns the original model's outputs. */
  async run(feeds: TensorMap): Promise<TensorMap> {
    const values = new Map(Object.entries(feeds));
    for (const u of [this.prefix, ...this.layers, this.suffix]) await this.runUnit(u, values);
    const result: TensorMap = {};
    for (const name of this.decoder.graphOutputs) result[name] = values.get(name)!;
    return result;
  }

  async release(): Promise<void> {
    for (const u of [this.prefix, ...this.layers, this.suffix]) await u.session.release();
  }
}

/** One-shot: open the units under `dir`, run them on `feeds`, close them. */
export async function runLayerByLayer(decoder: ExtractedDecoder, feeds: TensorMap, dir: string, opts: SessionOptions = {}): Promise<TensorMap> {
  const runner = await LayerByLayerRunner.create(decoder, dir, opts);
  try {
    return await runner.run(feeds);
  } finally {
    await runner.release();
  }
}
