/**
 * `modc codegen` without running tsc: what the wrapper declares for an original and a compiled
 * model, and the CLI's refusals. test/codegen-e2e.test.ts (slow) compiles and runs the wrappers.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { generateSession, sessionContract } from '../compiler/apps/codegen/index.js';
import { loadModel } from '../compiler/core/io/load.js';
import { expectOneLineError, fixture, runCli, tempDir } from './helpers.js';

const dir = tempDir('modc-codegen-unit');

/** The JSON initializer of `export const NAME: TYPE = ...;` in a generated file. */
function constant(src: string, name: string): unknown {
  const m = new RegExp(`export const ${name}(?::[^=]+)? = ([\\s\\S]*?)(?: as const)?;\\n`).exec(src);
  if (!m) throw new Error(`no constant ${name}`);
  return JSON.parse(m[1]!);
}

describe('modc codegen: what the wrapper declares', () => {
  it('an original model: every input typed with its dims, no routing, no cache lengths', () => {
    const path = fixture('forms-fused-gpt2-tiny');
    const src = generateSession(loadModel(path), path);
    expect(src).toMatch(/readonly "input_ids": "int32";/);
    expect(src).toMatch(/readonly "past_0": readonly \[2, "batch_size", 4, "past_seq_len", 8\];/);
    expect(constant(src, 'ROUTING')).toBeNull();
    const kv = constant(src, 'KV_LAYERS') as { layout: string; pastLength: string | null }[];
    expect(kv).toHaveLength(5);
    expect(kv.every((l) => l.layout === 'combined-2BHTD' && l.pastLength === null)).toBe(true);
  });

  it('a compiled model: routing metadata as constants, past_valid.l / present_valid.l per layer', async () => {
    const out = join(dir, 'llama', 'model.onnx');
    expect((await runCli('compile', fixture('llama-tiny'), '-o', out, '--router-init', 'random', '--routing', 'topk', '--capacity', '0.25', '-q')).code).toBe(
      0,
    );
    const src = generateSession(loadModel(out), out);
    const routing = constant(src, 'ROUTING') as { mode: string; layers: { layer: number; capacity: number; selected: string }[] };
    expect(routing.mode).toBe('topk');
    expect(routing.layers.map((l) => [l.layer, l.capacity])).toEqual([
      [0, 0.25],
      [1, 0.25],
      [2, 0.25],
    ]);
    expect(routing.layers.every((l) => l.selected.length > 0)).toBe(true);
    const kv = constant(src, 'KV_LAYERS') as { layer: number; pastValid: string; presentValid: string; pastLength: string | null }[];
    expect(kv.map((l) => [l.pastValid, l.presentValid, l.pastLength])).toEqual([0, 1, 2].map((l) => [`past_valid.${l}`, `present_valid.${l}`, null]));
    expect(src).toMatch(/readonly "past_valid.1": "bool";/);
  });

  it('a hybrid model: its conv/recurrent state is carried as STATE', () => {
    const path = fixture('forms-hybrid-tiny');
    const c = sessionContract(loadModel(path), 'model.onnx');
    const state = constant(generateSession(loadModel(path), path), 'STATE') as { past: string; present: string; dims: number[] }[];
    expect(state.length).toBeGreaterThan(0);
    expect(state.map((s) => s.past)).toEqual(c.io.state.map((s) => s.past));
    expect(state.every((s) => s.dims[0] === -1)).toBe(true);
  });

  it('a decoder fed by inputs_embeds: prefill and step take embedding tensors', () => {
    const path = fixture('forms-embeds-tiny');
    const src = generateSession(loadModel(path), path);
    expect(src).toMatch(/async prefill\(embeds: ort\.TypedTensor</);
    expect(src).toMatch(/async step\(embeds: ort\.TypedTensor</);
  });
});

describe('modc codegen: the command', () => {
  it('writes the file and reports it as JSON', async () => {
    const out = join(dir, 'cli', 'session.ts');
    const res = await runCli('codegen', fixture('llama-tiny'), '-o', out, '--class', 'Llama', '--json');
    expect(res.code).toBe(0);
    expect(JSON.parse(res.stdout)).toMatchObject({ output: out, layers: 3, routed: 0 });
    expect(readFileSync(out, 'utf8')).toMatch(/export class Llama \{/);
  });

  it('refuses a missing -o, a bad class name (usage, 2) and a directory as output (1)', async () => {
    expectOneLineError(await runCli('codegen', fixture('llama-tiny')), 2, /missing -o/);
    expectOneLineError(await runCli('codegen', fixture('llama-tiny'), '-o', join(dir, 'x.ts'), '--class', '1bad'), 2, /--class/);
    expectOneLineError(await runCli('codegen', fixture('llama-tiny'), '-o', dir), 1, /is a directory/);
    expect(existsSync(join(dir, 'x.ts'))).toBe(false);
  });

  it('a model that is not a decoder: one line, exit 1, nothing written', async () => {
    const out = join(dir, 'none.ts');
    expectOneLineError(await runCli('codegen', join(import.meta.dirname, '..', 'fixtures', 'llama-tiny', 'reference.json'), '-o', out), 1, /./);
    expect(existsSync(out)).toBe(false);
  });
});
