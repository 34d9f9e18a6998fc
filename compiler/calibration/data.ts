/**
 * Calibration data as token id sequences: JSON lines `{"ids": [...]}`, split at `maxLength`.
 * (A stand-in until the shared dataset reader lands; same format and errors.)
 */
import { readFileSync } from 'node:fs';
import { ModcError } from '../errors.js';

export function readIdLines(path: string, maxLength?: number): number[][] {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new ModcError(`cannot read data ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
  const out: number[][] = [];
  text.split(/\r?\n/).forEach((line, i) => {
    if (line.trim() === '') return;
    let ids: unknown;
    try {
      ids = (JSON.parse(line) as { ids?: unknown }).ids;
    } catch {
      throw new ModcError(`data ${path}: line ${i + 1} is not JSON (expected {"ids": [...]})`);
    }
    if (!Array.isArray(ids) || ids.some((v) => !Number.isInteger(v))) throw new ModcError(`data ${path}: line ${i + 1} has no "ids" array of integers`);
    const seq = ids as number[];
    const step = maxLength ?? seq.length;
    for (let at = 0; at < seq.length; at += Math.max(step, 1)) out.push(seq.slice(at, at + step));
  });
  if (out.length === 0) throw new ModcError(`data ${path} is empty: give one sequence per line`);
  return out;
}
