/**
 * The logits torch computed when a fixture was exported (its reference.json), and a replay of
 * those cases in ONNX Runtime: prefill with an empty past, then each decode case on the previous
 * case's own presents. Shared by the torch fixtures' and the quality fixture's tests.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createSession, emptyTensor, int64Tensor, type ort } from '../compiler/runtime/ort.js';

export interface TorchCase {
  name: string;
  input_ids: number[][];
  attention_mask: number[][];
  position_ids: number[][];
  /** [batch][sequence][vocab] */
  logits: number[][][];
}
export interface TorchReference {
  config: { layers: number; kvHeads: number; headSize: number; vocab?: number };
  cases: TorchCase[];
}

export function readTorchReference(dir: string): TorchReference {
  return JSON.parse(readFileSync(join(dir, 'reference.json'), 'utf8')) as TorchReference;
}

export const rows = (r: number[][]) => int64Tensor(r.flat(), [r.length, r[0]!.length]);

/** Empty `past_key_values.l.key|value` feeds for a prefill of `batch` rows. */
export function emptyPast(feeds: Record<string, ort.Tensor>, config: TorchReference['config'], batch: number): void {
  for (let l = 0; l < config.layers; l++) {
    for (const kv of ['key', 'value']) feeds[`past_key_values.${l}.${kv}`] = emptyTensor('float32', [batch, config.kvHeads, 0, config.headSize]);
  }
}

/** ONNX Runtime's logits for each reference case in order (a case named `prefill*` starts afresh). */
export async function replayInOrt(modelDir: string, ref: TorchReference): Promise<{ case: TorchCase; logits: Float32Array }[]> {
  const session = await createSession(join(modelDir, 'model.onnx'));
  let previous: ort.InferenceSession.OnnxValueMapType | null = null;
  const results: { case: TorchCase; logits: Float32Array }[] = [];
  for (const c of ref.cases) {
    const feeds: Record<string, ort.Tensor> = { input_ids: rows(c.input_ids), attention_mask: rows(c.attention_mask), position_ids: rows(c.position_ids) };
    if (c.name.startsWith('prefill') || previous === null) emptyPast(feeds, ref.config, c.input_ids.length);
    else
      for (let l = 0; l < ref.config.layers; l++)
        for (const kv of ['key', 'value']) feeds[`past_key_values.${l}.${kv}`] = previous[`present.${l}.${kv}`] as ort.Tensor;
    const out = await session.run(feeds);
    results.push({ case: c, logits: out.logits!.data as Float32Array });
    previous = out;
  }
  return results;
}
