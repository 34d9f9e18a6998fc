/**
 * The torch fixtures agree with torch: ONNX Runtime running each exported model reproduces the
 * logits torch computed at export time (prefill, then one decode step on ORT's own present).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createSession, emptyTensor, int64Tensor, ort } from '../compiler/runtime/ort.js';
import { ROOT } from './helpers.js';

interface Case {
  name: string;
  input_ids: number[][];
  attention_mask: number[][];
  position_ids: number[][];
  logits: number[][][];
}
interface Reference {
  config: { layers: number; kvHeads: number; headSize: number };
  cases: Case[];
}

const rows = (r: number[][]) => int64Tensor(r.flat(), [r.length, r[0]!.length]);

describe.each(['gpt2-tiny', 'llama-tiny', 'neox-tiny'])('fixture %s', (name) => {
  const ref = JSON.parse(readFileSync(join(ROOT, 'fixtures', name, 'reference.json'), 'utf8')) as Reference;

  it('ONNX Runtime reproduces torch logits, prefill and decode, batch 1 and 2 with left padding', async () => {
    const session = await createSession(join(ROOT, 'fixtures', name, 'model.onnx'));
    let previous: ort.InferenceSession.OnnxValueMapType | null = null;
    for (const c of ref.cases) {
      const batch = c.input_ids.length;
      const feeds: Record<string, ort.Tensor> = { input_ids: rows(c.input_ids), attention_mask: rows(c.attention_mask), position_ids: rows(c.position_ids) };
      for (let l = 0; l < ref.config.layers; l++) {
        for (const kv of ['key', 'value']) {
          feeds[`past_key_values.${l}.${kv}`] = c.name.startsWith('prefill')
            ? emptyTensor('float32', [batch, ref.config.kvHeads, 0, ref.config.headSize])
            : (previous![`present.${l}.${kv}`] as ort.Tensor);
        }
      }
      const out = await session.run(feeds);
      const got = out.logits!.data as Float32Array;
      const want = c.logits.flat(2);
      expect(got.length, c.name).toBe(want.length);
      let worst = 0;
      for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(got[i]! - want[i]!));
      expect(worst, `${c.name}: max |ORT - torch|`).toBeLessThan(1e-5);
      previous = out;
    }
  });
});
