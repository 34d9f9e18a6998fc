/**
 * The quality fixtures (fixtures/quality-lm and fixtures/quality-lm-deep, trained by
 * fixtures/torch/train_lm.py) are real language models: ONNX Runtime running each over its
 * held-out eval.jsonl reaches an NLL per byte far below the unigram entropy of the same bytes
 * (computed here from the data), and it reproduces torch's logits committed at export time
 * (prefill with left padding, two decode steps).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createSession, type ort } from '../compiler/runtime/ort.js';
import { ROOT } from './helpers.js';
import { emptyPast, readTorchReference, replayInOrt, rows } from './torch-reference.js';

/** Each fixture folder and its layer count (as a check that the right model was read). */
const FIXTURES = [
  { name: 'quality-lm', layers: 6 },
  { name: 'quality-lm-deep', layers: 12 },
];

function readLines(dir: string, file: string): number[][] {
  return readFileSync(join(dir, file), 'utf8')
    .trim()
    .split('\n')
    .map((l) => (JSON.parse(l) as { ids: number[] }).ids);
}

/** Entropy (nats) of the byte frequencies of every predicted byte (each byte after a line's first). */
function unigramEntropy(lines: number[][], vocab: number): number {
  const counts = new Array<number>(vocab).fill(0);
  let total = 0;
  for (const line of lines) {
    for (const id of line.slice(1)) {
      counts[id]! += 1;
      total += 1;
    }
  }
  return -counts.filter((c) => c > 0).reduce((h, c) => h + (c / total) * Math.log(c / total), 0);
}

describe.each(FIXTURES)('$name fixture', ({ name, layers }) => {
  const DIR = join(ROOT, 'fixtures', name);
  const reference = readTorchReference(DIR);
  const vocab = reference.config.vocab!;
  const evalLines = readLines(DIR, 'eval.jsonl');
  const calibLines = readLines(DIR, 'calib.jsonl');

  it('has held-out data: 256-byte lines, eval and calib disjoint', () => {
    expect(reference.config.layers).toBe(layers);
    expect(evalLines.length).toBeGreaterThanOrEqual(64);
    expect(calibLines.length).toBeGreaterThanOrEqual(64);
    for (const l of [...evalLines, ...calibLines]) {
      expect(l).toHaveLength(256);
      expect(l.every((id) => Number.isInteger(id) && id >= 0 && id < vocab)).toBe(true);
    }
    const calib = new Set(calibLines.map((l) => l.join(',')));
    expect(evalLines.filter((l) => calib.has(l.join(',')))).toEqual([]);
  });

  it('its held-out NLL in ONNX Runtime is more than 1 nat/byte below the unigram entropy', async () => {
    const session = await createSession(join(DIR, 'model.onnx'));
    let nll = 0;
    let count = 0;
    const batch = 16;
    for (let i = 0; i < evalLines.length; i += batch) {
      const chunk = evalLines.slice(i, i + batch);
      const [B, S] = [chunk.length, chunk[0]!.length];
      const feeds: Record<string, ort.Tensor> = {
        input_ids: rows(chunk),
        attention_mask: rows(chunk.map((l) => l.map(() => 1))),
        position_ids: rows(chunk.map((l) => l.map((_, t) => t))),
      };
      emptyPast(feeds, reference.config, B);
      const logits = (await session.run(feeds)).logits!.data as Float32Array;
      for (let b = 0; b < B; b++) {
        for (let t = 0; t + 1 < S; t++) {
          const row = logits.subarray((b * S + t) * vocab, (b * S + t + 1) * vocab);
          let max = -Infinity;
          for (const v of row) max = Math.max(max, v);
          let sum = 0;
          for (const v of row) sum += Math.exp(v - max);
          nll += max + Math.log(sum) - row[chunk[b]![t + 1]!]!;
          count += 1;
        }
      }
    }
    const meanNll = nll / count;
    const entropy = unigramEntropy(evalLines, vocab);
    expect(count).toBe(evalLines.length * 255);
    expect(Number.isFinite(meanNll)).toBe(true);
    expect(entropy).toBeGreaterThan(2.5); // text bytes, not a degenerate file
    expect(meanNll, `held-out NLL ${meanNll.toFixed(4)} vs unigram entropy ${entropy.toFixed(4)} nats/byte`).toBeLessThan(entropy - 1);
  });

  it('ONNX Runtime reproduces torch logits: prefill of 3 rows (one left-padded), then 2 decode steps', async () => {
    expect(reference.cases.map((c) => c.name)).toEqual(['prefill', 'decode1', 'decode2']);
    for (const { case: c, logits: got } of await replayInOrt(DIR, reference)) {
      const mask = c.attention_mask;
      const S = c.input_ids[0]!.length;
      const want = c.logits;
      let worst = 0;
      let scale = 0;
      // Real positions only (the padded row's padding positions carry no meaning).
      for (let b = 0; b < want.length; b++) {
        for (let t = 0; t < S; t++) {
          if (mask[b]![mask[b]!.length - S + t] === 0) continue;
          for (let v = 0; v < vocab; v++) {
            const w = want[b]![t]![v]!;
            const d = Math.abs(got[(b * S + t) * vocab + v]! - w);
            worst = Number.isNaN(d) ? Infinity : Math.max(worst, d);
            scale = Math.max(scale, Math.abs(w));
          }
        }
      }
      expect(scale, `${c.name}: logits are not tiny`).toBeGreaterThan(1);
      expect(worst, `${c.name}: max |ORT - torch|`).toBeLessThan(1e-4);
    }
  });
});
