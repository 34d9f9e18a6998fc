import { copyFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadDataset, readDataset } from '../compiler/apps/data/index.js';
import { ROOT, tempDir } from './helpers.js';

const DATA = join(ROOT, 'fixtures/data');
const LLAMA = join(ROOT, 'fixtures/llama-tiny/model.onnx');
const dir = tempDir('modc-data');
let n = 0;
function file(text: string, name = `d${n++}.jsonl`): string {
  const path = join(dir, name);
  writeFileSync(path, text);
  return path;
}

describe('JSON lines data', () => {
  it('reads one sequence per non-blank line', () => {
    expect(readDataset(join(DATA, 'tiny.jsonl'), { vocabSize: 512 })).toEqual([
      [1, 2, 3, 4, 5],
      [6, 7],
      [8, 9, 10, 11, 12, 13, 14],
    ]);
  });

  it('splits sequences longer than maxLength into consecutive pieces', () => {
    const d = loadDataset(join(DATA, 'tiny.jsonl'), { vocabSize: 512, maxLength: 3 });
    expect(d.sequences).toEqual([[1, 2, 3], [4, 5], [6, 7], [8, 9, 10], [11, 12, 13], [14]]);
    expect(d).toMatchObject({ format: 'jsonl', lines: 3, tokens: 14, maxLength: 3, tokenizer: null });
  });

  it('reads the vocabulary bound from the model', () => {
    const path = file('{"ids": [1, 511]}\n{"ids": [512]}\n');
    expect(() => readDataset(path, { model: LLAMA })).toThrow(/line 2: token id 512 is outside the model's vocabulary \(0-511\)/);
  });
});

describe('bad data gets a one-line error', () => {
  const cases: [string, string, RegExp][] = [
    ['an empty file', '', /is empty/],
    ['a file of blank lines', '\n  \n\n', /is empty/],
    ['bad JSON on line 3', '{"ids": [1]}\n{"ids": [2]}\n{"ids": [3,\n', /line 3: bad JSON/],
    ['a line without ids', '{"ids": [1]}\n{"tokens": [2]}\n', /line 2: expected \{"ids": \[\.\.\.\]\}/],
    ['a negative id', '{"ids": [1, -4]}\n', /line 1: token id -4 is not a non-negative integer/],
    ['a fractional id', '{"ids": [1.5]}\n', /line 1: token id 1.5 is not/],
    ['an id outside the vocabulary', '{"ids": [1]}\n{"ids": [3, 70]}\n', /line 2: token id 70 is outside the model's vocabulary \(0-63\)/],
    ['an empty sequence', '{"ids": [1]}\n{"ids": []}\n', /line 2: no tokens/],
  ];
  for (const [what, text, pattern] of cases) {
    it(what, () => {
      const path = file(text);
      let message = '';
      try {
        readDataset(path, { vocabSize: 64 });
      } catch (e) {
        message = (e as Error).message;
        expect((e as Error).name).toBe('ModcError');
      }
      expect(message).toMatch(pattern);
      expect(message).toContain(path);
      expect(message.split('\n')).toHaveLength(1);
    });
  }

  it('a missing file', () => {
    expect(() => readDataset(join(dir, 'nope.jsonl'))).toThrow(/cannot read data .*nope\.jsonl: ENOENT/);
  });

  it('a non-positive maxLength', () => {
    expect(() => readDataset(join(DATA, 'tiny.jsonl'), { maxLength: 0 })).toThrow(/max length must be a positive integer/);
  });

  it('plain text with no tokenizer beside the model', () => {
    expect(() => readDataset(join(DATA, 'cats.txt'), { model: LLAMA })).toThrow(/plain text but there is no tokenizer.json beside the model/);
  });
});

describe('plain text data', () => {
  // fixtures/data/tokenizer.json: a BPE over [UNK]=0, a-z = 1-26, . , ! ? ' = 27-31, then merges
  // th=32 the=33 at=34 cat=35 sat=36 on=37 mat=38 is=39; lowercased, split on whitespace and punctuation.
  const line1 = [33, 35, 36, 37, 33, 38, 27]; // the cat sat on the mat .
  const line2 = [33, 38, 39, 37, 33, 35, 29]; // the mat is on the cat !

  it('is tokenized by the tokenizer.json beside the model, one sequence per line', () => {
    const modelDir = tempDir('modc-data-model');
    copyFileSync(LLAMA, join(modelDir, 'model.onnx'));
    copyFileSync(join(DATA, 'tokenizer.json'), join(modelDir, 'tokenizer.json'));
    const d = loadDataset(join(DATA, 'cats.txt'), { model: join(modelDir, 'model.onnx') });
    expect(d.sequences).toEqual([line1, line2]);
    expect(d).toMatchObject({ format: 'text', lines: 2, tokenizer: join(modelDir, 'tokenizer.json') });
  });

  it('maps unknown words to the unk token and splits at maxLength', () => {
    const path = file('The dog!\n', 'dog.txt');
    expect(readDataset(path, { tokenizer: join(DATA, 'tokenizer.json'), vocabSize: 40, maxLength: 2 })).toEqual([[33, 4], [15, 7], [29]]);
  });

  it('refuses text tokenized outside the model vocabulary', () => {
    expect(() => readDataset(join(DATA, 'cats.txt'), { tokenizer: join(DATA, 'tokenizer.json'), vocabSize: 30 })).toThrow(/line 1: token id 33 is outside/);
  });
});
