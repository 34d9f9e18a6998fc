/**
 * The third-party decoder exports the interop suite runs: read in place from ../shared/models
 * (the folder beside the clone; never copied into the repository). Each entry is one export; a
 * new one is one more entry.
 */
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { ROOT } from '../helpers.js';

/** ../shared/models, beside the clone. */
export const SHARED_MODELS = resolve(ROOT, '..', 'shared', 'models');

export interface RealExport {
  /** The folder under ../shared/models. */
  name: string;
  /** The model file in it. */
  file: string;
  /** Layers modc must find. */
  layers: number;
  /** The export runs one row per call (DecoderIo.batchOne): every command gets batch 1. */
  batchOne?: boolean;
}

/**
 * The exports the suite checks end to end. ort-gpt2-megatron-4dmask (a caller-supplied 4-D float
 * mask) has further checks of its own in megatron.test.ts.
 */
export const REAL_EXPORTS: readonly RealExport[] = [
  { name: 'ort-gpt2-fused', file: 'model.onnx', layers: 5 },
  { name: 'ort-qwen2-gqa', file: 'model.onnx', layers: 2 },
  { name: 'mobius-attn24-dynamic-kv', file: 'model.onnx', layers: 1, batchOne: true },
  { name: 'mobius-gqa-fp16-packed', file: 'model.onnx', layers: 1 },
  { name: 'ort-gpt2-megatron-4dmask', file: 'gpt2_megatron.onnx', layers: 1 },
];

/**
 * Why the interop suite cannot run, in one line, or null: the folder is missing, or an export in
 * REAL_EXPORTS is not in it.
 */
export function sharedModelsProblem(dir: string = SHARED_MODELS, exports: readonly RealExport[] = REAL_EXPORTS): string | null {
  const where =
    'the interop suite reads third-party decoder exports in place from ../shared/models, the folder beside the clone; ' +
    'its README.md names the public repository each file comes from (microsoft/onnxruntime-genai and microsoft/onnxruntime test data, justinchuby/onnx-genai test fixtures)';
  if (!existsSync(dir)) return `missing ${dir}: ${where}`;
  const absent = exports.map((e) => join(dir, e.name, e.file)).filter((p) => !existsSync(p));
  if (absent.length) return `missing ${absent.join(', ')}: ${where}`;
  return null;
}

/** The path of an export's model file. */
export const sharedModel = (e: RealExport): string => join(SHARED_MODELS, e.name, e.file);
