/**
 * CLI rough edges: --dump-after names, negative numbers, --layers out of range, verify on a pair
 * that does not belong together (source fingerprint), threshold vs capacity in --json, and the
 * flags --help must document.
 */
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { attachNegativeValues } from '../compiler/cli/main.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { checkCompiledFrom, graphFingerprint, readSource, SOURCE_METADATA_KEY } from '../compiler/metadata/source-fingerprint.js';
import { type CliResult, expectOneLineError, fixture, runCli, tempDir } from './helpers.js';

const tmp = tempDir('modc-edges');
const LLAMA = fixture('llama-tiny');
let n = 0;
const out = () => join(tmp, `o${n++}`, 'model.onnx');

describe('--dump-after', () => {
  it('refuses a pass that is not in the pipeline (exit 2), before writing anything', async () => {
    const o = out();
    const res = await runCli('compile', LLAMA, '-o', o, '--router-init', 'random', '--dump-after', 'route-layer');
    expectOneLineError(res, 2, /--dump-after route-layer: no such pass in this pipeline \(.*route-layers.*, or \*\)/);
    expect(existsSync(join(o, '..'))).toBe(false);
    expectOneLineError(
      await runCli('compile', LLAMA, '-o', out(), '--passes', 'cleanup', '--dump-after', 'insert-routers'),
      2,
      /--dump-after insert-routers: no such pass/,
    );
  });

  it('still dumps after a pass that runs', async () => {
    const o = out();
    expect((await runCli('compile', LLAMA, '-o', o, '--passes', 'cleanup', '--dump-after', 'cleanup', '-q')).code).toBe(0);
    expect(readdirSync(join(o, '..')).sort()).toEqual(['01-cleanup.onnx', '01-cleanup.txt', 'model.onnx']);
  });
});

describe('negative numbers', () => {
  it('a negative value after a flag that takes one is its value, not "ambiguous"', () => {
    const opts = {
      seed: { type: 'string' as const, help: '' },
      json: { type: 'boolean' as const, help: '' },
      steps: { type: 'string' as const, short: 's', help: '' },
    };
    expect(attachNegativeValues(['m.onnx', '--seed', '-1', '--json'], opts)).toEqual(['m.onnx', '--seed=-1', '--json']);
    expect(attachNegativeValues(['-s', '-2.5'], opts)).toEqual(['--steps=-2.5']);
    expect(attachNegativeValues(['--json', '-1'], opts)).toEqual(['--json', '-1']);
    expect(attachNegativeValues(['--seed', '-q'], opts)).toEqual(['--seed', '-q']);
  });

  it('--seed -1 is accepted and seeds differently from --seed 1', async () => {
    const [a, b] = [out(), out()];
    expect((await runCli('compile', LLAMA, '-o', a, '--router-init', 'random', '--seed', '-1', '-q')).code).toBe(0);
    expect((await runCli('compile', LLAMA, '-o', b, '--router-init', 'random', '--seed', '1', '-q')).code).toBe(0);
    const weights = (p: string) =>
      [...loadModel(p).graph.initializers.keys()]
        .filter((k) => /router/i.test(k))
        .map((k) => Array.from(loadModel(p).graph.initializers.get(k)!.initializer!.proto.raw_data ?? []).join(','));
    expect(weights(a).length).toBeGreaterThan(0);
    expect(weights(a)).not.toEqual(weights(b));
  });

  it.each([
    [['verify', LLAMA, LLAMA, '--tolerance', '-1'], /--tolerance must be a non-negative number/],
    [['verify', LLAMA, LLAMA, '--steps', '-1'], /--steps must be an integer >= 0/],
    [['compile', LLAMA, '-o', join(tmp, 'neg', 'm.onnx'), '--router-init', 'random', '--threshold', '-0.5'], /--threshold must be in \[0, 1\], got -0\.5/],
    [['generate', LLAMA, '--ids', '1,2', '--max-new', '-3'], /--max-new must be a non-negative integer/],
  ])('%j is a usage error naming the flag', async (args, pattern) => {
    const res = await runCli(...(args as string[]));
    expectOneLineError(res, 2, pattern as RegExp);
    expect(res.stderr).not.toMatch(/ambiguous/);
  });
});

describe('--layers out of range', () => {
  it('is a usage error (exit 2)', async () => {
    expectOneLineError(
      await runCli('compile', LLAMA, '-o', out(), '--router-init', 'random', '--layers', '1,9'),
      2,
      /--layers names layer 9, but the model has 3 layers \(0-2\)/,
    );
  });
});

describe('verify refuses a compiled model made from another original', () => {
  it('the fingerprint survives a re-save and changes with one weight byte', () => {
    const model = loadModel(LLAMA);
    const fp = graphFingerprint(model);
    expect(fp).toMatch(/^[0-9a-f]{64}$/);
    const copy = out();
    saveModel(model, copy);
    expect(graphFingerprint(loadModel(copy))).toBe(fp);
    const changed = loadModel(LLAMA);
    const [name, v] = [...changed.graph.initializers].find(([, x]) => (x.initializer?.proto.raw_data?.length ?? 0) > 16)!;
    v.initializer!.proto.raw_data![3] ^= 1;
    expect(graphFingerprint(changed), name).not.toBe(fp);
    expect(graphFingerprint(loadModel(fixture('gpt2-tiny')))).not.toBe(fp);
  });

  it('compile records the source; verify names the mismatch (exit 1); a copy of the original passes the check', async () => {
    const compiled = out();
    expect((await runCli('compile', LLAMA, '-o', compiled, '--router-init', 'random', '-q')).code).toBe(0);
    expect(readSource(loadModel(compiled))).toBe(graphFingerprint(loadModel(LLAMA)));
    const res = await runCli('verify', fixture('gpt2-tiny'), compiled);
    expectOneLineError(res, 1, /was not compiled from .*gpt2-tiny.*: its recorded source graph is [0-9a-f]{12}/);
    expect(res.stdout).toBe('');
    // Same architecture, one weight changed: still refused.
    const other = loadModel(LLAMA);
    const v = [...other.graph.initializers.values()].find((x) => (x.initializer?.proto.raw_data?.length ?? 0) > 16)!;
    v.initializer!.proto.raw_data![0] ^= 1;
    const otherPath = out();
    saveModel(other, otherPath);
    expectOneLineError(await runCli('verify', otherPath, compiled), 1, /was not compiled from/);
    const copy = out();
    saveModel(loadModel(LLAMA), copy);
    expect(() => checkCompiledFrom(loadModel(copy), loadModel(compiled), copy, compiled)).not.toThrow();
  });
});

describe('verify on a compiled model it cannot check: one line naming the problem, never a pass message', () => {
  const HYBRID = fixture('forms-hybrid-tiny');
  const INT32 = fixture('forms-int32-tiny');
  /** A compiled model without its recorded source (one compiled before modc recorded it, or stripped). */
  async function compiledWithoutSource(source: string, ...args: string[]): Promise<string> {
    const path = out();
    expect((await runCli('compile', source, '-o', path, '-q', ...args)).code).toBe(0);
    const model = loadModel(path);
    model.metadataProps = model.metadataProps.filter((p) => p.key !== SOURCE_METADATA_KEY);
    const stripped = out();
    saveModel(model, stripped);
    return stripped;
  }
  const refused = (res: CliResult, pattern: RegExp) => {
    expectOneLineError(res, 1, pattern);
    expect(res.stderr).not.toMatch(/\bpass [a-z-]+:|insert-routers first|routingPlanOf/);
    expect(res.stdout).toBe('');
  };

  it("a compiled model that routes no layer (a --passes pipeline wrote it): nothing to verify, with each layer's reason", async () => {
    const compiled = out();
    const res = await runCli(
      'compile',
      HYBRID,
      '-o',
      compiled,
      '-q',
      '--router-init',
      'all-pass',
      '--layers',
      '0',
      '--passes',
      'insert-routers,route-layers,cleanup',
    );
    expect(res.code).toBe(0);
    refused(
      await runCli('verify', HYBRID, compiled, '--steps', '1'),
      /the compiled model routes no layer, so there is nothing to verify \(layer 0: .*state besides the KV cache/,
    );
  });

  it('an original with fewer layers than the compiled model routes: not its source', async () => {
    const compiled = await compiledWithoutSource(fixture('quality-lm'), '--router-init', 'random', '--layers', '5');
    refused(
      await runCli('verify', LLAMA, compiled, '--steps', '1'),
      /routes layer 5, but .*llama-tiny.* has 3 layers \(0-2\): it is not the compiled model's source/,
    );
  });

  it('an original of another width: not its source (not a failed check)', async () => {
    const compiled = await compiledWithoutSource(INT32, '--router-init', 'random', '--layers', '1');
    refused(
      await runCli('verify', LLAMA, compiled, '--steps', '1'),
      /router of layer 1 reads 32 features, but .*hidden size is 64: it is not the compiled model's source/,
    );
  });

  it('an original that cannot route the layer the compiled model routes: not its source, with the reason', async () => {
    const compiled = await compiledWithoutSource(INT32, '--router-init', 'random', '--layers', '0');
    refused(
      await runCli('verify', HYBRID, compiled, '--steps', '1'),
      /forms-hybrid-tiny.* cannot route layer 0 as the compiled model does \(.*state besides the KV cache.*\): it is not the compiled model's source/,
    );
  });
});

describe('--json reports what applies', () => {
  it("threshold mode: each layer's threshold and no capacity; topk: the capacity and no threshold", async () => {
    const th = JSON.parse((await runCli('compile', LLAMA, '-o', out(), '--router-init', 'random', '--threshold', '0.3', '--json')).stdout);
    expect(th.routing.mode).toBe('threshold');
    type Entry = Record<string, unknown>;
    const only = (entries: Entry[], key: string, value: number, absent: string) => {
      expect(entries.map((e) => e.layer)).toEqual([0, 1, 2]);
      for (const e of entries) {
        expect(e[key]).toBe(value);
        expect(e).not.toHaveProperty(absent);
      }
    };
    only(th.routing.converted, 'threshold', 0.3, 'capacity');
    const o = out();
    const tk = JSON.parse((await runCli('compile', LLAMA, '-o', o, '--router-init', 'random', '--routing', 'topk', '--capacity', '0.25', '--json')).stdout);
    only(tk.routing.converted, 'capacity', 0.25, 'threshold');
    const inspected = JSON.parse((await runCli('inspect', o, '--json')).stdout);
    only(inspected.routing.layers, 'capacity', 0.25, 'threshold');
  });
});

describe('--help documents every flag', () => {
  it('compile: --dump-dir, --no-verify, --external-data-threshold, -q; every command: --progress, -q', async () => {
    const help = (await runCli('compile', '--help')).stdout;
    for (const flag of [/--dump-dir DIR\s+\S/, /--no-verify\s+\S/, /--external-data-threshold BYTES\s+\S/, /-q, --quiet\s+\S/, /--progress\s+\S/])
      expect(help).toMatch(flag);
    for (const cmd of ['inspect', 'run', 'generate', 'verify', 'bench']) {
      const h = (await runCli(cmd, '--help')).stdout;
      expect(h, cmd).toMatch(/-q, --quiet/);
      expect(h, cmd).toMatch(/--progress/);
    }
  });
});
