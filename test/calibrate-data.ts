/** The calibration tests' model (llama-tiny) and its dims, and seeded data for it. */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { mulberry32 } from '../compiler/core/random.js';
import { ROOT } from './helpers.js';

export const MODEL = join(ROOT, 'fixtures', 'llama-tiny', 'model.onnx');
export const HIDDEN = 64;
export const LAYERS = 3;
export const VOCAB = 512;

/** Seeded sequences of ids with some structure (a noisy repeating pattern), as JSON lines. */
export function writeData(path: string, lines: number, length: number, seed: number, vocab = VOCAB): void {
  const next = mulberry32(seed);
  const out: string[] = [];
  for (let i = 0; i < lines; i++) {
    const period = 3 + Math.floor(next() * 5);
    const base = Array.from({ length: period }, () => Math.floor(next() * vocab));
    const ids = Array.from({ length }, (_, t) => (next() < 0.2 ? Math.floor(next() * vocab) : base[t % period]!));
    out.push(JSON.stringify({ ids }));
  }
  writeFileSync(path, out.join('\n') + '\n');
}
