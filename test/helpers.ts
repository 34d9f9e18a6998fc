/** Shared test utilities: the model zoo, temp folders, generic feeds, in-process CLI runs. */
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, expect } from 'vitest';
import { main } from '../compiler/cli/main.js';
import type { Value } from '../compiler/core/ir/graph.js';
import type { Model } from '../compiler/core/ir/model.js';
import { DataType } from '../compiler/core/ir/dtype.js';
import { ort } from '../compiler/runtime/ort.js';

export const ROOT = resolve(import.meta.dirname, '..');
/**
 * The bundled models, each made by the project's own scripts (fixtures/torch, fixtures/builder).
 * Third-party exports are not bundled: test/interop reads them in place from ../shared/models.
 */
export const FIXTURES = join(ROOT, 'fixtures');

/** The path of a bundled model: fixture('llama-tiny') is fixtures/llama-tiny/model.onnx. */
export function fixture(name: string): string {
  const path = join(FIXTURES, name, 'model.onnx');
  if (!existsSync(path)) throw new Error(`no fixture ${name} (${path})`);
  return path;
}

/** Every bundled model the project must handle: every fixtures/NAME/model.onnx. */
export function allModels(): { name: string; path: string }[] {
  const out: { name: string; path: string }[] = [];
  for (const entry of readdirSync(FIXTURES).sort()) {
    const path = join(FIXTURES, entry, 'model.onnx');
    if (existsSync(path)) out.push({ name: `fixtures/${entry}`, path });
  }
  return out;
}

/**
 * The models `npm test` runs the end-to-end MoD contract on: one per attention form (ONNX Runtime's
 * fused GPT-2 form, Attention with a combined past; its GroupQueryAttention form in fp16 with right
 * padding; a torch export with rotary positions and a parallel residual). `npm run test:slow`
 * runs the contract on the rest.
 */
export const QUICK_MODELS = ['neox-tiny', 'forms-fused-gpt2-tiny', 'forms-gqa-fp16-tiny'];

/**
 * The models a slow per-model suite (SPLIT_BY_MODEL in vitest.config.ts) runs on, chosen by the vitest project
 * (vitest.config.ts sets MODC_TEST_MODELS): `quick` -> QUICK_MODELS, `rest` -> every other
 * fixture, unset -> all of them. `npx vitest run` runs both projects, so every model once.
 */
export function contractModels(): { name: string; path: string }[] {
  const which = process.env.MODC_TEST_MODELS ?? 'all';
  if (!['quick', 'rest', 'all'].includes(which)) throw new Error(`MODC_TEST_MODELS must be quick, rest or all, not ${which}`);
  const quick = (m: { name: string }) => QUICK_MODELS.some((q) => m.name === `fixtures/${q}`);
  const models = allModels();
  if (which === 'quick') {
    const picked = models.filter(quick);
    if (picked.length !== QUICK_MODELS.length) throw new Error(`missing quick fixtures: ${QUICK_MODELS.join(', ')}`);
    return picked;
  }
  return which === 'rest' ? models.filter((m) => !quick(m)) : models;
}

/** A temp folder removed after the test file finishes. */
export function tempDir(tag = 'modc-test'): string {
  const dir = mkdtempSync(join(tmpdir(), `${tag}-`));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** A failed command: the exit code, and one stderr line `modc: ...` matching `pattern`, no stack. */
export function expectOneLineError(res: CliResult, code: number, pattern: RegExp): void {
  expect(res.code).toBe(code);
  expect(res.stderr.trim().split('\n')).toHaveLength(1);
  expect(res.stderr).toMatch(/^modc: /);
  expect(res.stderr).toMatch(pattern);
  expect(res.stderr).not.toMatch(/\n\s+at /);
}

export async function runCli(...args: string[]): Promise<CliResult> {
  let stdout = '';
  let stderr = '';
  const code = await main(args, { out: (t) => (stdout += t + '\n'), err: (t) => (stderr += t + '\n') });
  return { code, stdout, stderr };
}

/** `modc compile MODEL --routers ROUTERS -o OUT`, then `modc eval OUT --data DATA --json`: eval's JSON (both must exit 0). */
export async function compileAndEval<T>(model: string, routers: string, out: string, data: string): Promise<T> {
  const c = await runCli('compile', model, '--routers', routers, '-o', out, '-q');
  expect(c.code, c.stderr).toBe(0);
  const ev = await runCli('eval', out, '--data', data, '--json', '-q');
  expect(ev.code, ev.stderr).toBe(0);
  return JSON.parse(ev.stdout) as T;
}

const ORT_TYPES: Record<number, ort.Tensor.Type> = {
  [DataType.FLOAT]: 'float32',
  [DataType.FLOAT16]: 'float16',
  [DataType.INT64]: 'int64',
  [DataType.INT32]: 'int32',
};

/**
 * Feeds for a prefill with an empty past, from the graph's input signature: ids are small
 * deterministic numbers, the mask is all ones, positions count up, pasts have length 0.
 */
export function prefillFeeds(model: Model, batch: number, seq: number): Record<string, ort.Tensor> {
  const feeds: Record<string, ort.Tensor> = {};
  for (const v of model.graph.inputs) {
    if (model.graph.initializers.has(v.name)) continue;
    feeds[v.name] = feedFor(v, batch, seq);
  }
  return feeds;
}

function feedFor(v: Value, batch: number, seq: number): ort.Tensor {
  const type = ORT_TYPES[v.dtype ?? 0];
  if (!type) throw new Error(`no test feed for input ${v.name} of type ${v.dtype}`);
  const isPast = /past/i.test(v.name);
  const dims = (v.shape ?? []).map((d, i) => {
    if (typeof d === 'number') return d;
    const name = String(d ?? '').toLowerCase();
    if (/batch/.test(name) || (i === 0 && !isPast)) return batch;
    if (/past/.test(name)) return 0;
    return seq;
  });
  const n = dims.reduce((a, b) => a * b, 1);
  const fill = (i: number): number => {
    if (/mask/i.test(v.name)) return 1;
    if (/position/i.test(v.name)) return i % seq;
    if (/input_ids/i.test(v.name)) return (i * 7 + 3) % 50;
    return 0;
  };
  switch (type) {
    case 'int64':
      return new ort.Tensor(
        'int64',
        BigInt64Array.from({ length: n }, (_, i) => BigInt(fill(i))),
        dims,
      );
    case 'int32':
      return new ort.Tensor(
        'int32',
        Int32Array.from({ length: n }, (_, i) => fill(i)),
        dims,
      );
    case 'float16':
      return new ort.Tensor('float16', new Uint16Array(n), dims);
    default:
      return new ort.Tensor('float32', new Float32Array(n), dims);
  }
}
