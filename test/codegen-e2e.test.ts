/**
 * `modc codegen` end to end: the generated wrapper passes the exact strict tsc command docs/commands.md
 * promises, in a folder with no package.json and only onnxruntime-node beside it, and running it
 * (prefill then steps) gives the logits and per-layer cache lengths ModSession gives on the same ids.
 * Slow (several tsc runs): in the slow project (vitest.config.ts SLOW_FILES).
 */
import { execFile } from 'node:child_process';
import { mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { beforeAll, describe, expect, it } from 'vitest';
import { ModSession } from '../compiler/runtime/session.js';
import { fixture, ROOT, runCli, tempDir } from './helpers.js';

const run = promisify(execFile);
const TSC = join(ROOT, 'node_modules', '.bin', 'tsc');
const TSX = join(ROOT, 'node_modules', '.bin', 'tsx');
const TSC_ARGS = ['--noEmit', '--strict', '--module', 'nodenext', '--moduleResolution', 'nodenext', '--target', 'es2022', '--skipLibCheck', 'session.ts'];

/** Each case: a model (original or compiled here) and the prompt the wrapper and ModSession both run. */
const CASES = [
  {
    name: 'llama-original',
    source: 'llama-tiny',
    compile: null,
    prompt: [
      [5, 6, 7, 8, 9],
      [10, 11, 12],
    ],
  },
  {
    name: 'llama-random',
    source: 'llama-tiny',
    compile: ['--router-init', 'random', '--seed', '3'],
    prompt: [
      [5, 6, 7, 8, 9],
      [10, 11, 12],
    ],
  },
  {
    name: 'gqa-fp16-topk',
    source: 'forms-gqa-fp16-tiny',
    compile: ['--router-init', 'random', '--routing', 'topk', '--capacity', '0.5'],
    prompt: [
      [5, 6, 7, 8, 9, 10],
      [11, 12, 13],
    ],
  },
  {
    name: 'hybrid-random',
    source: 'forms-hybrid-tiny',
    compile: ['--router-init', 'random'],
    prompt: [
      [5, 6, 7, 8],
      [9, 10, 11, 12],
    ],
  },
  // Routed sliding-window layers carry past_positions.l / present_positions.l.
  {
    name: 'gqa-window-random',
    source: 'forms-gqa-window-tiny',
    compile: ['--router-init', 'random'],
    prompt: [
      [5, 6, 7, 8, 9, 10, 11, 12],
      [13, 14, 15, 16, 17],
    ],
  },
  // The caller's 4-D mask [B, 1, 64, 64]: the wrapper builds it, and feeds past_sequence_length.
  {
    name: 'megatron-random',
    source: 'forms-megatron-tiny',
    compile: ['--router-init', 'random'],
    prompt: [
      [5, 6, 7, 8, 9, 10],
      [11, 12, 13],
    ],
  },
] as const;
const FORCE = [3, 17, 4];

interface Trace {
  logits: number[][][];
  lengths: number[][][];
}

const dir = tempDir('modc-codegen');
const models = new Map<string, string>();
let traces: Record<string, Trace> = {};

beforeAll(async () => {
  mkdirSync(join(dir, 'node_modules'));
  symlinkSync(join(ROOT, 'node_modules', 'onnxruntime-node'), join(dir, 'node_modules', 'onnxruntime-node'));
  for (const c of CASES) {
    const folder = join(dir, c.name);
    let model = fixture(c.source);
    if (c.compile) {
      model = join(folder, 'model.onnx');
      const res = await runCli('compile', fixture(c.source), '-o', model, '-q', ...c.compile);
      expect(res.stderr).toBe('');
    }
    models.set(c.name, model);
    const res = await runCli('codegen', model, '-o', join(folder, 'session.ts'));
    expect(res.code, res.stderr).toBe(0);
  }
  // One driver runs every wrapper: prefill, then a step per FORCE id, recording what a caller sees.
  const driver = [
    ...CASES.map((c, i) => `import { DecoderSession as S${i} } from './${c.name}/session';`),
    'async function trace(s: { prefill(r: number[][]): Promise<any>; step(n: number[]): Promise<any>; lastLogits(l: any): Float32Array[]; cacheLengths(): number[][] }, prompt: number[][]) {',
    '  const logits: number[][][] = [];',
    '  const lengths: number[][][] = [];',
    '  let l = await s.prefill(prompt);',
    '  logits.push(s.lastLogits(l).map((r) => Array.from(r)));',
    '  lengths.push(s.cacheLengths());',
    `  for (const id of ${JSON.stringify(FORCE)}) {`,
    '    l = await s.step(prompt.map(() => id));',
    '    logits.push(s.lastLogits(l).map((r) => Array.from(r)));',
    '    lengths.push(s.cacheLengths());',
    '  }',
    '  return { logits, lengths };',
    '}',
    'async function main() {',
    '  const out: Record<string, unknown> = {};',
    ...CASES.map(
      (c, i) => `  out[${JSON.stringify(c.name)}] = await trace(await S${i}.create(${JSON.stringify(models.get(c.name))}), ${JSON.stringify(c.prompt)});`,
    ),
    '  process.stdout.write(JSON.stringify(out));',
    '}',
    'main().catch((e) => { console.error(e); process.exit(1); });',
  ].join('\n');
  writeFileSync(join(dir, 'driver.ts'), driver);
  const { stdout } = await run(TSX, ['driver.ts'], { cwd: dir, maxBuffer: 1 << 28 });
  traces = JSON.parse(stdout) as Record<string, Trace>;
}, 600_000);

describe('modc codegen: the generated wrapper compiles and runs', () => {
  it.each(CASES.map((c) => c.name))('%s passes tsc --strict --module nodenext in a folder with no package.json', async (name) => {
    const res = await run(TSC, TSC_ARGS, { cwd: join(dir, name) }).then(
      () => ({ ok: true, out: '' }),
      (e: { stdout?: string }) => ({ ok: false, out: e.stdout ?? String(e) }),
    );
    expect(res.out).toBe('');
    expect(res.ok).toBe(true);
  });

  it('imports nothing but onnxruntime-node, and has no top-level await or import.meta', () => {
    for (const c of CASES) {
      const src = readFileSync(join(dir, c.name, 'session.ts'), 'utf8');
      expect([...src.matchAll(/^import .* from '([^']+)';$/gm)].map((m) => m[1])).toEqual(['onnxruntime-node']);
      expect(src).not.toMatch(/import\.meta|^await /m);
    }
  });

  it.each(CASES)("$name: prefill and steps give ModSession's logits and cache lengths", async (c) => {
    const session = await ModSession.create(models.get(c.name)!);
    const want = await session.generate(
      c.prompt.map((r) => [...r]),
      { maxNewTokens: FORCE.length, force: FORCE },
    );
    const got = traces[c.name]!;
    expect(got.logits).toHaveLength(FORCE.length + 1);
    got.logits.forEach((rows, t) =>
      rows.forEach((row, b) => {
        const ref = want.steps[t]![b]!;
        expect(row).toHaveLength(ref.length);
        let worst = 0;
        for (let i = 0; i < ref.length; i++) worst = Math.max(worst, Math.abs(row[i]! - ref[i]!));
        expect(worst, `step ${t} row ${b}`).toBeLessThanOrEqual(1e-5);
        expect(row.some((v) => v !== 0)).toBe(true);
      }),
    );
    // After the last step: the same per-layer lengths ModSession reports.
    expect(got.lengths.at(-1)).toEqual(session.layerCacheLengths());
  });

  it('compiled wrappers carry per-layer lengths that differ from the context (compacted caches)', () => {
    const lengths = traces['llama-random']!.lengths.at(-1)!;
    const context = [5 + FORCE.length, 3 + FORCE.length];
    expect(lengths.some((layer) => layer.some((n, b) => n < context[b]!))).toBe(true);
    expect(traces['llama-original']!.lengths.at(-1)!.every((layer) => layer.every((n, b) => n === context[b]))).toBe(true);
  });
});
