import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { saveModel } from '../compiler/core/io/save.js';
import { loadModel } from '../compiler/core/io/load.js';
import { decodeModelProto, encodeModelProto } from '../compiler/core/proto/index.js';
import { expectOneLineError, ROOT, runCli, FIXTURES, tempDir } from './helpers.js';

const tmp = tempDir('modc-cli');
const GPT2_FUSED = join(FIXTURES, 'forms-fused-gpt2-tiny', 'model.onnx');

describe('modc inspect', () => {
  it('prints versions, I/O, op histogram and parameters', async () => {
    const res = await runCli('inspect', GPT2_FUSED);
    expect(res.code).toBe(0);
    expect(res.stdout).toMatch(/opsets: ai\.onnx 11, com\.microsoft 1/);
    expect(res.stdout).toMatch(/producer\s+modc fixtures\/builder/);
    expect(res.stdout).toMatch(/past_0\s+float\s+\[2, batch_size, 4, past_seq_len, 8\]/);
    expect(res.stdout).toMatch(/com\.microsoft\s+SkipLayerNormalization 10, Attention 5, FastGelu 5, EmbedLayerNormalization 1/);
  });

  it('--json gives the same facts as data', async () => {
    const res = await runCli('inspect', GPT2_FUSED, '--json');
    expect(res.code).toBe(0);
    const j = JSON.parse(res.stdout);
    expect(j.irVersion).toBe(6);
    expect(j.inputs.map((i: { name: string }) => i.name)).toEqual([
      'input_ids',
      'position_ids',
      'attention_mask',
      'past_0',
      'past_1',
      'past_2',
      'past_3',
      'past_4',
    ]);
    expect(j.outputs[0]).toEqual({ name: 'logits', dtype: 'float', shape: ['batch_size', 'seq_len', 1000] });
    expect(j.ops['com.microsoft'].Attention).toBe(5);
    expect(j.ops[''].MatMul).toBe(16);
    expect(j.parameters.externalBytes).toBe(0);
    expect(j.parameters.internalBytes).toBeGreaterThan(500_000);
  });
});

describe('errors: one line naming the problem, exit code 1 (2 for usage)', () => {
  it('missing file', async () => {
    expectOneLineError(await runCli('inspect', join(tmp, 'nope.onnx')), 1, /cannot read .*nope\.onnx: no such file/);
  });

  it('a file that is not ONNX', async () => {
    const p = join(tmp, 'text.onnx');
    writeFileSync(p, 'hello, this is not a model\n'.repeat(10));
    expectOneLineError(await runCli('inspect', p), 1, /text\.onnx: (corrupt or truncated ONNX protobuf|not an ONNX model)/);
  });

  it('an empty file', async () => {
    const p = join(tmp, 'empty.onnx');
    writeFileSync(p, '');
    expectOneLineError(await runCli('inspect', p), 1, /empty file/);
  });

  it('a truncated protobuf', async () => {
    const p = join(tmp, 'truncated.onnx');
    const bytes = readFileSync(GPT2_FUSED);
    writeFileSync(p, bytes.subarray(0, Math.floor(bytes.length / 2)));
    expectOneLineError(await runCli('inspect', p), 1, /truncated\.onnx: corrupt or truncated ONNX protobuf/);
  });

  it('missing external data', async () => {
    const dir = join(tmp, 'ext');
    mkdirSync(dir, { recursive: true });
    const src = join(dir, 'src.onnx');
    copyFileSync(GPT2_FUSED, src);
    const model = loadModel(src);
    saveModel(model, join(dir, 'model.onnx'), { externalizeThreshold: 1024 });
    const proto = decodeModelProto(readFileSync(join(dir, 'model.onnx')));
    for (const t of proto.graph!.initializer) for (const e of t.external_data) if (e.key === 'location') e.value = 'gone.data';
    writeFileSync(join(dir, 'broken.onnx'), encodeModelProto(proto));
    expectOneLineError(await runCli('inspect', join(dir, 'broken.onnx')), 1, /missing external data: 'gone\.data'/);
  });

  it('an external data path that escapes the model folder', async () => {
    const dir = join(tmp, 'esc');
    mkdirSync(dir, { recursive: true });
    copyFileSync(GPT2_FUSED, join(dir, 'src.onnx'));
    saveModel(loadModel(join(dir, 'src.onnx')), join(dir, 'model.onnx'), { externalizeThreshold: 1024 });
    const proto = decodeModelProto(readFileSync(join(dir, 'model.onnx')));
    for (const t of proto.graph!.initializer) for (const e of t.external_data) if (e.key === 'location') e.value = '../../etc/passwd';
    writeFileSync(join(dir, 'escape.onnx'), encodeModelProto(proto));
    expectOneLineError(await runCli('compile', join(dir, 'escape.onnx'), '-o', join(tmp, 'x.onnx'), '--passes', 'none'), 1, /escapes the model folder/);
    expect(existsSync(join(tmp, 'x.onnx'))).toBe(false);
  });

  it('output path equal to the input', async () => {
    const p = join(tmp, 'same.onnx');
    copyFileSync(GPT2_FUSED, p);
    const before = readFileSync(p);
    expectOneLineError(await runCli('compile', p, '-o', p, '--passes', 'none'), 1, /refusing to overwrite the input model/);
    expect(readFileSync(p).equals(before)).toBe(true);
  });

  it('usage errors exit 2', async () => {
    expectOneLineError(await runCli('compile', GPT2_FUSED, '--passes', 'none'), 2, /missing -o/);
    expectOneLineError(await runCli('compile', GPT2_FUSED, '-o', join(tmp, 'u.onnx'), '--passes', 'frobnicate'), 2, /unknown pass 'frobnicate'/);
    expectOneLineError(await runCli('inspect'), 2, /missing model path/);
    expectOneLineError(await runCli('inspect', GPT2_FUSED, '--bogus'), 2, /bogus/);
    expectOneLineError(await runCli('explode'), 2, /unknown command 'explode'/);
  });

  it('a failed compile leaves no output and no temp files', async () => {
    const dir = join(tmp, 'nohalf');
    mkdirSync(dir, { recursive: true });
    const res = await runCli('compile', join(tmp, 'missing.onnx'), '-o', join(dir, 'out.onnx'), '--passes', 'cleanup');
    expect(res.code).toBe(1);
    expect(readdirSync(dir)).toEqual([]);
  });
});

describe('modc compile', () => {
  it('runs named passes, reports them, and dumps after a pass', async () => {
    const out = join(tmp, 'compiled', 'model.onnx');
    const res = await runCli('compile', GPT2_FUSED, '-o', out, '--passes', 'lift-constants,cleanup', '--dump-after', 'cleanup', '--json');
    expect(res.code).toBe(0);
    const report = JSON.parse(res.stdout);
    expect(report.passes.map((p: { pass: string }) => p.pass)).toEqual(['lift-constants', 'cleanup']);
    expect(existsSync(join(tmp, 'compiled', '02-cleanup.onnx'))).toBe(true);
    expect(readFileSync(join(tmp, 'compiled', '02-cleanup.txt'), 'utf8')).toMatch(/com\.microsoft::Attention/);
  });

  it('--help tells the passes and options', async () => {
    const res = await runCli('compile', '--help');
    expect(res.code).toBe(0);
    expect(res.stdout).toMatch(/--passes LIST/);
    expect(res.stdout).toMatch(/cleanup\s+remove nodes/);
  });
});

describe('the modc command', () => {
  it('stops quietly when its reader closes the pipe early', async () => {
    const { spawn } = await import('node:child_process');
    // Megabytes of logits: far more than a pipe buffer, so writes are still pending when it closes.
    const ids = Array.from({ length: 200 }, (_, i) => i % 500).join(',');
    const child = spawn(process.execPath, [
      join(ROOT, 'bin', 'modc.js'),
      'run',
      join(ROOT, 'fixtures', 'gpt2-tiny', 'model.onnx'),
      '--ids',
      `${ids};${ids}`,
      '--json',
    ]);
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    child.stdout.once('data', () => child.stdout.destroy());
    const code = await new Promise<number | null>((done) => child.on('close', done));
    expect(stderr).toBe('');
    expect(code).toBe(0);
  });
});
