/**
 * ModSession drives a decoder the way torch did when making the references: padding, masks,
 * positions and caches between calls. Checked against the torch fixtures' reference logits.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ModSession } from '../compiler/runtime/session.js';
import { ROOT, FIXTURES, runCli } from './helpers.js';
import { compileWith } from './mod-helpers.js';

interface Case {
  name: string;
  input_ids: number[][];
  attention_mask: number[][];
  logits: number[][][];
}

function maxDiff(a: Float32Array, b: number[]): number {
  expect(a.length).toBe(b.length);
  let worst = 0;
  for (let i = 0; i < b.length; i++) worst = Math.max(worst, Math.abs(a[i]! - b[i]!));
  return worst;
}

describe.each(['gpt2-tiny', 'llama-tiny', 'neox-tiny'])('ModSession on %s', (name) => {
  const path = join(ROOT, 'fixtures', name, 'model.onnx');
  const cases = (JSON.parse(readFileSync(join(ROOT, 'fixtures', name, 'reference.json'), 'utf8')) as { cases: Case[] }).cases;
  const byName = (n: string) => cases.find((c) => c.name === n)!;

  it('prefill with left padding, then a step, matches torch', async () => {
    const s = await ModSession.create(path);
    const prefill = byName('prefill_b2_leftpad');
    const rows = prefill.input_ids.map((r, b) => r.filter((_, i) => prefill.attention_mask[b]![i]));
    const p = await s.forward(rows);
    expect(p.dims).toEqual([2, 7, 512]);
    expect(maxDiff(p.data, prefill.logits.flat(2))).toBeLessThan(1e-5);
    const decode = byName('decode_b2_leftpad');
    const d = await s.step(decode.input_ids.map((r) => r[0]!));
    expect(maxDiff(d.data, decode.logits.flat(2))).toBeLessThan(1e-5);
    expect(s.layerCacheLengths()).toEqual([
      [6, 8],
      [6, 8],
      [6, 8],
    ]);
    const kvHeads = name === 'llama-tiny' ? 2 : 4;
    expect(s.kvBytes()).toBe(3 * 2 * 2 * kvHeads * 8 * 16 * 4);
  });

  it('refuses ids outside the vocabulary and steps before a prompt', async () => {
    const s = await ModSession.create(path);
    await expect(s.step([1])).rejects.toThrow(/before forward/);
    await expect(s.forward([[1, 512]])).rejects.toThrow(/token id 512 is outside the vocabulary \(0-511\)/);
  });
});

describe('checkpoint and restore', () => {
  const tmp = mkdtempSync(join(tmpdir(), 'modc-checkpoint-'));
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));
  const same = (a: Float32Array, b: Float32Array) => {
    expect(a.length).toBe(b.length);
    expect(a.every((v, i) => v === b[i])).toBe(true);
  };

  it.each([
    ['the original llama-tiny', () => join(FIXTURES, 'llama-tiny', 'model.onnx')],
    [
      'llama-tiny with random routers (per-layer valid slots)',
      () => compileWith(tmp, join(FIXTURES, 'llama-tiny', 'model.onnx'), 'random', { gated: false }).path,
    ],
    [
      'forms-gqa-tiny with random routers (per-layer lengths)',
      () => compileWith(tmp, join(FIXTURES, 'forms-gqa-tiny', 'model.onnx'), 'random', { gated: false }).path,
    ],
  ])('%s: a step after restore() gives what the first step after the prompt gave, and the caches go back', async (_, make) => {
    const path = make();
    const rows = [
      [5, 6, 7, 8, 9, 10],
      [11, 12, 13, 14, 15, 16],
    ];
    const s = await ModSession.create(path);
    await s.forward(rows);
    const saved = s.checkpoint();
    const lengths = s.layerCacheLengths();
    const first = await s.step([20, 21]);
    const second = await s.step([22, 23]);
    expect(s.attentionMask()[0]).toHaveLength(8);
    s.restore(saved);
    expect(s.layerCacheLengths()).toEqual(lengths);
    expect(s.attentionMask()[0]).toHaveLength(6);
    same((await s.step([20, 21])).data, first.data);
    // The checkpoint stays usable: again, then the same second step.
    s.restore(saved);
    same((await s.step([20, 21])).data, first.data);
    same((await s.step([22, 23])).data, second.data);
    await expect(
      (async () => {
        const other = await ModSession.create(path);
        other.restore(saved);
      })(),
    ).rejects.toThrow(/checkpoint of the same session/);
  });
});

describe('modc run', () => {
  it('--json prints logits as [batch][position][vocab] with the mask', async () => {
    const res = await runCli('run', join(FIXTURES, 'forms-fused-gpt2-tiny', 'model.onnx'), '--ids', '5,6,7;8,9', '--json');
    expect(res.code).toBe(0);
    const j = JSON.parse(res.stdout);
    expect(j.dims).toEqual([2, 3, 1000]);
    expect(j.logits).toHaveLength(2);
    expect(j.logits[1]).toHaveLength(3);
    expect(j.logits[1][2]).toHaveLength(1000);
    expect(j.attentionMask).toEqual([
      [1, 1, 1],
      [0, 1, 1],
    ]);
    expect(j.inputIds).toEqual([
      [5, 6, 7],
      [0, 8, 9],
    ]);
  });

  it('converts float16 logits to numbers', async () => {
    const res = await runCli('run', join(FIXTURES, 'forms-gqa-fp16-tiny', 'model.onnx'), '--ids', '5,6,7', '--pad', 'right', '--json');
    expect(res.code).toBe(0);
    expect(typeof JSON.parse(res.stdout).logits[0][0][0]).toBe('number');
  });

  it('refuses bad ids and bad flags with one-line errors', async () => {
    const model = join(ROOT, 'fixtures', 'gpt2-tiny', 'model.onnx');
    expect((await runCli('run', model, '--ids', '1,2,600')).stderr).toMatch(/^modc: token id 600 is outside the vocabulary \(0-511\)\n$/);
    expect((await runCli('run', model, '--ids', '1,x')).code).toBe(2);
    expect((await runCli('run', model, '--ids', '1;')).code).toBe(2);
    expect((await runCli('run', model, '--ids', '1', '--pad', 'middle')).code).toBe(2);
    expect((await runCli('run', model)).stderr).toMatch(/missing --ids/);
  });
});

describe('modc generate', () => {
  const model = join(ROOT, 'fixtures', 'llama-tiny', 'model.onnx');

  it('greedy decoding feeds back the argmax; --json has ids, steps, kvBytes, cacheLengths', async () => {
    const res = await runCli('generate', model, '--ids', '1,2,3;4,5', '--max-new', '3', '--logits', '--json');
    expect(res.code).toBe(0);
    const j = JSON.parse(res.stdout);
    expect(j.steps).toHaveLength(4);
    expect(j.steps[0].logits).toHaveLength(2);
    expect(j.steps[0].logits[0]).toHaveLength(512);
    for (let t = 0; t < 3; t++) {
      for (let b = 0; b < 2; b++) {
        const l: number[] = j.steps[t].logits[b];
        expect(j.ids[b][[3, 2][b]! + t]).toBe(l.indexOf(Math.max(...l)));
      }
    }
    expect(j.cacheLengths).toEqual([
      [6, 5],
      [6, 5],
      [6, 5],
    ]);
    expect(j.kvBytes).toBe(3 * 2 * 2 * 2 * 6 * 16 * 4);
  });

  it('--force feeds the given ids', async () => {
    const j = JSON.parse((await runCli('generate', model, '--ids', '1,2', '--max-new', '2', '--force', '7,8', '--json')).stdout);
    expect(j.ids).toEqual([[1, 2, 7, 8]]);
    expect(j.steps[0]).toEqual({});
  });

  it('refuses a --force of the wrong length', async () => {
    const res = await runCli('generate', model, '--ids', '1,2', '--max-new', '3', '--force', '7,8');
    expect(res.code).toBe(1);
    expect(res.stderr).toMatch(/--force has 2 ids but --max-new is 3/);
  });
});

describe('context length', () => {
  it('refuses a context longer than the model has positions for, at the prompt and at a step', async () => {
    const s = await ModSession.create(join(FIXTURES, 'forms-fused-gpt2-tiny', 'model.onnx'));
    expect(s.io.maxPositions).toBe(512);
    await expect(s.forward([Array(513).fill(1)])).rejects.toThrow(/a context of 513 tokens is longer than the model's 512 positions/);
    await s.forward([Array(511).fill(1)]);
    await s.step([2]);
    await expect(s.step([2])).rejects.toThrow(/longer than the model's 512 positions/);
    const res = await runCli('generate', join(ROOT, 'fixtures', 'genai-tiny', 'model.onnx'), '--ids', Array(250).fill(3).join(','), '--max-new', '10');
    expect(res.code).toBe(1);
    expect(res.stderr).toMatch(/^modc: a context of 257 tokens is longer than the model's 256 positions\n$/);
  });
});
