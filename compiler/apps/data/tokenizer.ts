/**
 * Plain text to token ids with the model's own tokenizer: a Hugging Face `tokenizer.json` (and
 * optional `tokenizer_config.json`) beside the model, run by @huggingface/tokenizers.
 */
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { ModcError } from '../../core/errors.js';

export interface TextTokenizer {
  /** The tokenizer.json it was read from. */
  path: string;
  encode(text: string): number[];
}

/** The tokenizer.json beside a model file, or null when there is none. */
export function tokenizerBeside(modelPath: string): string | null {
  const path = join(dirname(modelPath), 'tokenizer.json');
  return existsSync(path) ? path : null;
}

export function loadTokenizer(path: string): TextTokenizer {
  const json = readJson(path);
  const configPath = join(dirname(path), 'tokenizer_config.json');
  const config = existsSync(configPath) ? readJson(configPath) : {};
  let tokenizer: Tokenizer;
  try {
    tokenizer = new Tokenizer(json, config);
  } catch (e) {
    throw new ModcError(`cannot use tokenizer ${path}: ${(e as Error).message.split('\n')[0]}`);
  }
  return {
    path,
    encode(text) {
      const { ids, tokens } = tokenizer.encode(text);
      const missing = (ids as unknown[]).findIndex((id) => !Number.isInteger(id));
      if (missing >= 0) throw new ModcError(`tokenizer ${path} has no id for the token '${tokens[missing]}' (and no usable unk_token)`);
      return ids as number[];
    },
  };
}

function readJson(path: string): object {
  try {
    return JSON.parse(readFileSync(path, 'utf8')) as object;
  } catch (e) {
    throw new ModcError(`cannot read ${path}: ${(e as Error).message.split('\n')[0]}`);
  }
}
