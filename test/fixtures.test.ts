/**
 * The torch fixtures agree with torch: ONNX Runtime running each exported model reproduces the
 * logits torch computed at export time (prefill, then one decode step on ORT's own present).
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ROOT } from './helpers.js';
import { readTorchReference, replayInOrt } from './torch-reference.js';

describe.each(['gpt2-tiny', 'llama-tiny', 'neox-tiny'])('fixture %s', (name) => {
  const dir = join(ROOT, 'fixtures', name);

  it('ONNX Runtime reproduces torch logits, prefill and decode, batch 1 and 2 with left padding', async () => {
    const ref = readTorchReference(dir);
    expect(ref.cases.length).toBeGreaterThan(1);
    for (const { case: c, logits: got } of await replayInOrt(dir, ref)) {
      const want = c.logits.flat(2);
      expect(got.length, c.name).toBe(want.length);
      let worst = 0;
      for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(got[i]! - want[i]!));
      expect(worst, `${c.name}: max |ORT - torch|`).toBeLessThan(1e-5);
    }
  });
});
