/**
 * `modc eval --generate N --original FILE`: top-1 agreement of greedy decoding with the dense
 * original on the same ids (fixtures/quality-lm, 4 held-out lines, 8 tokens each).
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { readDataset } from '../compiler/apps/data/index.js';
import { ROOT, fixture, runCli, tempDir } from './helpers.js';

const DIR = join(ROOT, 'fixtures', 'quality-lm');
const MODEL = join(DIR, 'model.onnx');
const tmp = tempDir('modc-eval-generate');
const data = join(tmp, 'four.jsonl');

interface Generate {
  tokens: number;
  prefixes: number;
  agreement: number;
  allAgree: number;
}

async function agreement(compileFlags: string[], name: string): Promise<Generate> {
  const out = join(tmp, name, 'model.onnx');
  const c = await runCli('compile', MODEL, '-o', out, '-q', ...compileFlags);
  expect(c.code, c.stderr).toBe(0);
  const ev = await runCli('eval', out, '--data', data, '--generate', '8', '--original', MODEL, '--json', '-q');
  expect(ev.code, ev.stderr).toBe(0);
  return (JSON.parse(ev.stdout) as { generate: Generate }).generate;
}

describe('modc eval --generate', () => {
  beforeAll(() => {
    const rows = readDataset(join(DIR, 'eval.jsonl'), { vocabSize: null }).slice(0, 4);
    writeFileSync(data, rows.map((ids) => JSON.stringify({ ids: ids.slice(0, 64) })).join('\n') + '\n');
  });

  it('an all-pass compile agrees with its original on every token', async () => {
    const g = await agreement(['--router-init', 'all-pass'], 'all-pass');
    expect(g).toEqual({ tokens: 8, prefixes: 4, agreement: 1, allAgree: 1 });
  });

  it('random routers at capacity 1/8 on every layer disagree somewhere', async () => {
    const g = await agreement(['--router-init', 'random', '--routing', 'topk', '--capacity', '0.125'], 'random');
    expect(g.tokens).toBe(8);
    expect(g.prefixes).toBe(4);
    expect(g.agreement).toBeLessThan(1);
    expect(g.agreement).toBeGreaterThanOrEqual(0);
  });

  it('a compiled model needs --original, and --original must be the model it was compiled from', async () => {
    const out = join(tmp, 'all-pass', 'model.onnx');
    const missing = await runCli('eval', out, '--data', data, '--generate', '4');
    expect(missing.code).not.toBe(0);
    expect(missing.stderr).toMatch(/^modc: --generate needs --original/);
    const other = await runCli('eval', out, '--data', data, '--generate', '4', '--original', fixture('llama-tiny'));
    expect(other.code).not.toBe(0);
    expect(other.stderr).toMatch(/^modc: /);
    expect(other.stderr).not.toMatch(/\n\s+at /);
  });
});
