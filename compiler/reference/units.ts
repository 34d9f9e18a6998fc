/** Loading and running the reference executor's units (standalone ONNX models chained by value name). */
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { RunnableUnit } from '../analysis/extract.js';
import type { LoadedUnit } from '../analysis/layer-executor.js';
import { ModcError } from '../errors.js';
import { saveModel } from '../io/save.js';
import { createSession, type ort, type SessionOptions } from '../runtime/ort.js';

export async function loadUnit(unit: RunnableUnit, dir: string, opts: SessionOptions = {}): Promise<LoadedUnit> {
  mkdirSync(dir, { recursive: true });
  const path = join(dir, `${unit.name}.onnx`);
  saveModel(unit.model, path);
  return { unit, session: await createSession(path, opts), path };
}

/** Runs one unit, reading its inputs from `values` and adding its outputs there. */
export async function runUnit(loaded: LoadedUnit, values: Map<string, ort.Tensor>): Promise<void> {
  const feeds: Record<string, ort.Tensor> = {};
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

export async function releaseUnits(units: readonly LoadedUnit[]): Promise<void> {
  for (const u of units) await u.session.release();
}
