/**
 * Evaluation and calibration data: sequences of token ids.
 *
 * Two formats, told apart by content:
 * - JSON lines, one sequence per line: `{"ids": [1, 2, 3]}` (blank lines are skipped);
 * - plain text, one sequence per non-blank line, tokenized by the `tokenizer.json` beside the model.
 * Sequences longer than `maxLength` are cut into consecutive pieces of at most `maxLength` tokens.
 */
import { readFileSync } from 'node:fs';
import { ModcError } from '../../core/errors.js';
import { loadModel } from '../../core/io/load.js';
import { decoderIo } from '../../metadata/decoder-io.js';
import { loadTokenizer, tokenizerBeside } from './tokenizer.js';

export interface DatasetOptions {
  /** The model the data is for: its vocabulary bounds the ids, and plain text uses the tokenizer.json beside it. */
  model?: string;
  /** Ids must be below this (read from `model` when absent; null: unchecked). */
  vocabSize?: number | null;
  /** Cut longer sequences into pieces of at most this many tokens. */
  maxLength?: number;
  /** A tokenizer.json to use instead of the one beside the model. */
  tokenizer?: string;
}

export interface Dataset {
  path: string;
  format: 'jsonl' | 'text';
  /** The tokenizer.json that read plain text. */
  tokenizer: string | null;
  /** Non-blank lines read. */
  lines: number;
  /** After splitting at maxLength. */
  sequences: number[][];
  tokens: number;
  maxLength: number | null;
}

/** The data's sequences of token ids (see `loadDataset`). */
export function readDataset(path: string, opts: DatasetOptions = {}): number[][] {
  return loadDataset(path, opts).sequences;
}

export function loadDataset(path: string, opts: DatasetOptions = {}): Dataset {
  if (opts.maxLength !== undefined && (!Number.isInteger(opts.maxLength) || opts.maxLength < 1)) {
    throw new ModcError(`max length must be a positive integer, got ${opts.maxLength}`);
  }
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new ModcError(`cannot read data ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
  const lines = text
    .split(/\r?\n/)
    .map((line, i) => ({ line, number: i + 1 }))
    .filter((l) => l.line.trim() !== '');
  if (lines.length === 0) throw new ModcError(`data ${path} is empty: give one sequence per line`);

  const format = lines[0]!.line.trimStart().startsWith('{') ? 'jsonl' : 'text';
  let tokenizer: string | null = null;
  let rows: { ids: number[]; number: number }[];
  if (format === 'jsonl') {
    rows = lines.map(({ line, number }) => ({ ids: parseIdsLine(path, line, number), number }));
  } else {
    tokenizer = opts.tokenizer ?? (opts.model ? tokenizerBeside(opts.model) : null);
    if (!tokenizer) {
      throw new ModcError(
        `data ${path} is plain text but there is no tokenizer.json beside the model${opts.model ? ` (${opts.model})` : ''}: put one there, or give JSON lines {"ids": [...]}`,
      );
    }
    const tok = loadTokenizer(tokenizer);
    rows = lines.map(({ line, number }) => ({ ids: tok.encode(line), number }));
  }

  const vocab = opts.vocabSize !== undefined ? opts.vocabSize : opts.model ? decoderIo(loadModel(opts.model)).vocabSize : null;
  const sequences: number[][] = [];
  for (const { ids, number } of rows) {
    if (ids.length === 0) throw new ModcError(`data ${path} line ${number}: no tokens`);
    const bad = vocab !== null ? ids.find((id) => id >= vocab) : undefined;
    if (bad !== undefined) throw new ModcError(`data ${path} line ${number}: token id ${bad} is outside the model's vocabulary (0-${vocab! - 1})`);
    sequences.push(...split(ids, opts.maxLength));
  }
  return { path, format, tokenizer, lines: lines.length, sequences, tokens: sequences.reduce((a, s) => a + s.length, 0), maxLength: opts.maxLength ?? null };
}

function parseIdsLine(path: string, line: string, number: number): number[] {
  let parsed: unknown;
  try {
    parsed = JSON.parse(line);
  } catch (e) {
    throw new ModcError(`data ${path} line ${number}: bad JSON (${(e as Error).message.split('\n')[0]})`);
  }
  const ids = (parsed as { ids?: unknown } | null)?.ids;
  if (!Array.isArray(ids)) throw new ModcError(`data ${path} line ${number}: expected {"ids": [...]}`);
  const bad = ids.find((id) => typeof id !== 'number' || !Number.isInteger(id) || id < 0);
  if (bad !== undefined) throw new ModcError(`data ${path} line ${number}: token id ${JSON.stringify(bad)} is not a non-negative integer`);
  return ids as number[];
}

function split(ids: number[], maxLength: number | undefined): number[][] {
  if (maxLength === undefined || ids.length <= maxLength) return [ids];
  const pieces: number[][] = [];
  for (let i = 0; i < ids.length; i += maxLength) pieces.push(ids.slice(i, i + maxLength));
  return pieces;
}
