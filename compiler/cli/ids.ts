/** Parsing token-id arguments: rows separated by `;`, ids by `,`. */
import { UsageError } from '../errors.js';

export function parseIdRows(text: string, flag = '--ids'): number[][] {
  const rows = text.split(';').map((r) => r.trim());
  if (rows.length === 0 || rows.some((r) => r === '')) throw new UsageError(`${flag}: every row needs at least one id (rows are separated by ';', ids by ',')`);
  return rows.map((r) => parseIdList(r, flag));
}

export function parseIdList(text: string, flag: string): number[] {
  return text.split(',').map((s) => {
    const t = s.trim();
    if (!/^\d+$/.test(t)) throw new UsageError(`${flag}: '${t}' is not a token id (non-negative integer)`);
    return Number(t);
  });
}
