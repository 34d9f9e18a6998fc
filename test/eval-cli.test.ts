/** `modc eval` on the command line: the --json shape, the text summary, plain-text data, one-line errors. */
import { copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ROOT, expectOneLineError, runCli, tempDir } from './helpers.js';

const LLAMA = join(ROOT, 'fixtures/llama-tiny/model.onnx');
const GPT2 = join(ROOT, 'fixtures/gpt2-tiny/model.onnx');
const DATA = join(ROOT, 'fixtures/data');
const dir = tempDir('modc-eval-cli');

describe('modc eval', () => {
  it('--json: metrics, per-layer parts, and the data and settings that produced them', async () => {
    const res = await runCli('eval', LLAMA, '--data', join(DATA, 'tiny.jsonl'), '--max-length', '4', '--batch', '2', '--json');
    expect(res.code).toBe(0);
    expect(res.stderr).toBe('');
    const j = JSON.parse(res.stdout);
    // tiny.jsonl: lines of 5, 2 and 7 ids; split at 4: 4+1, 2, 4+3 -> 5 sequences, 14 - 5 = 9 predicted tokens.
    expect(j).toMatchObject({
      model: LLAMA,
      tokens: 9,
      inputTokens: 14,
      sequences: 5,
      computeFraction: 1,
      kvFraction: 1,
      routing: null,
      data: { path: join(DATA, 'tiny.jsonl'), format: 'jsonl', tokenizer: null, lines: 3, sequences: 5 },
      settings: { maxLength: 4, batch: 2, pad: 'right', ep: 'cpu' },
    });
    expect(j.perplexity).toBeCloseTo(Math.exp(j.nll), 10);
    expect(j.layers).toEqual([0, 1, 2].map((layer) => ({ layer, part: 'block', routed: false, selectedFraction: 1 })));
  });

  it("a compiled model: a readable summary with each routed layer's selected fraction", async () => {
    const out = join(dir, 'topk/model.onnx');
    expect((await runCli('compile', LLAMA, '-o', out, '--router-init', 'random', '--routing', 'topk', '--capacity', '0.5', '--layers', '1')).code).toBe(0);
    const res = await runCli('eval', out, '--data', join(DATA, 'tiny.jsonl'));
    expect(res.code).toBe(0);
    expect(res.stdout).toMatch(/modc-compiled, topk, gated/);
    expect(res.stdout).toMatch(/nll +\d+\.\d{4} nats per token over 11 predicted tokens/);
    expect(res.stdout).toMatch(/compute +0\.\d{4} of the dense/);
    // ceil(5/2) + ceil(2/2) + ceil(7/2) = 3 + 1 + 4 = 8 of 14 tokens selected, and so held in its cache.
    expect(res.stdout).toMatch(new RegExp(`\\n +1 +block +${(8 / 14).toFixed(4)} +${(8 / 14).toFixed(4)}\\n`));
    expect(res.stdout).toMatch(/\n +0 +dense +1\.0000 +1\.0000\n/);
  });

  it('its NLL agrees with one computed from `modc run --json` logits of each line', async () => {
    const out = join(dir, 'topk/model.onnx'); // compiled by the test above
    const lines = [
      [1, 2, 3, 4, 5],
      [6, 7],
      [8, 9, 10, 11, 12, 13, 14],
    ]; // fixtures/data/tiny.jsonl
    let total = 0;
    for (const line of lines) {
      const run = JSON.parse((await runCli('run', out, '--ids', line.join(','), '--json')).stdout) as { logits: number[][][] };
      for (let t = 0; t + 1 < line.length; t++) {
        const row = run.logits[0]![t]!;
        const max = Math.max(...row);
        total += max + Math.log(row.reduce((a, x) => a + Math.exp(x - max), 0)) - row[line[t + 1]!]!;
      }
    }
    const j = JSON.parse((await runCli('eval', out, '--data', join(DATA, 'tiny.jsonl'), '--json')).stdout);
    expect(j.tokens).toBe(11);
    expect(Math.abs(j.nll - total / 11)).toBeLessThan(1e-3);
  });

  it('plain text with the tokenizer.json beside the model', async () => {
    const model = join(dir, 'with-tokenizer/model.onnx');
    mkdirSync(join(dir, 'with-tokenizer'), { recursive: true });
    copyFileSync(LLAMA, model);
    copyFileSync(join(DATA, 'tokenizer.json'), join(dir, 'with-tokenizer/tokenizer.json'));
    const j = JSON.parse((await runCli('eval', model, '--data', join(DATA, 'cats.txt'), '--json')).stdout);
    // Two lines of 7 tokens each.
    expect(j).toMatchObject({ tokens: 12, inputTokens: 14, data: { format: 'text', tokenizer: join(dir, 'with-tokenizer/tokenizer.json') } });
  });

  it('splits lines longer than the model context by default', async () => {
    const path = join(dir, 'long.jsonl');
    writeFileSync(path, JSON.stringify({ ids: Array.from({ length: 300 }, (_, i) => i % 500) }) + '\n');
    const j = JSON.parse((await runCli('eval', GPT2, '--data', path, '--json')).stdout);
    expect(j).toMatchObject({ sequences: 2, inputTokens: 300, tokens: 298, settings: { maxLength: 256 } });
  });

  it('refuses bad input with one line', async () => {
    const bad = join(dir, 'bad.jsonl');
    writeFileSync(bad, '{"ids": [1, 2]}\n{"ids": [3,\n');
    const outside = join(dir, 'outside.jsonl');
    writeFileSync(outside, '{"ids": [1, 512]}\n');
    const empty = join(dir, 'empty.jsonl');
    writeFileSync(empty, '');
    expectOneLineError(await runCli('eval', LLAMA), 2, /missing --data/);
    expectOneLineError(await runCli('eval', '--data', bad), 2, /missing model path/);
    expectOneLineError(await runCli('eval', LLAMA, '--data', bad), 1, /line 2: bad JSON/);
    expectOneLineError(await runCli('eval', LLAMA, '--data', outside), 1, /line 1: token id 512 is outside the model's vocabulary \(0-511\)/);
    expectOneLineError(await runCli('eval', LLAMA, '--data', empty), 1, /is empty/);
    expectOneLineError(await runCli('eval', LLAMA, '--data', join(DATA, 'cats.txt')), 1, /plain text but there is no tokenizer\.json beside the model/);
    expectOneLineError(await runCli('eval', GPT2, '--data', bad, '--max-length', '300'), 2, /--max-length 300 is longer than the model's context of 256/);
    expectOneLineError(await runCli('eval', LLAMA, '--data', bad, '--batch', '0'), 2, /--batch must be an integer >= 1/);
    expectOneLineError(await runCli('eval', LLAMA, '--data', bad, '--pad', 'middle'), 2, /--pad must be left or right/);
  });

  it('refuses a model with last-position logits only', async () => {
    const out = join(dir, 'last/model.onnx');
    expect((await runCli('compile', LLAMA, '-o', out, '--router-init', 'all-pass', '--logits', 'last')).code).toBe(0);
    expectOneLineError(await runCli('eval', out, '--data', join(DATA, 'tiny.jsonl')), 1, /logits for the last position only .*compile with --logits all/);
  });

  it('refuses a compiled model without recorded costs', async () => {
    const out = join(dir, 'no-costs/model.onnx');
    expect(
      (await runCli('compile', LLAMA, '-o', out, '--passes', 'split-fused-boundaries,insert-routers,route-layers,cleanup', '--router-init', 'all-pass')).code,
    ).toBe(0);
    expectOneLineError(await runCli('eval', out, '--data', join(DATA, 'tiny.jsonl')), 1, /has no modc\.costs metadata.*recompile it/);
  });
});
