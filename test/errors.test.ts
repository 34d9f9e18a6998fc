/**
 * Every bad input docs/commands.md lists under "Bad input", for every command that takes it: one
 * stderr line `modc: ...` naming the problem, no stack, and the documented exit code. One case
 * also runs through bin/modc.js in a child process, so the real stderr is checked too.
 */
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { Graph, Value } from '../compiler/core/ir/graph.js';
import { Model } from '../compiler/core/ir/model.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { writeRouterFile } from '../compiler/routing/router-weights.js';
import { decodeModelProto, encodeModelProto } from '../compiler/core/proto/index.js';
import { expectOneLineError, fixture, ROOT, runCli, tempDir } from './helpers.js';

const tmp = tempDir('modc-errors');
const LLAMA = fixture('llama-tiny');
const bad: Record<string, string> = {};
let compiled = '';
const data = () => join(tmp, 'data.jsonl');

/** The model's weights moved to a sidecar file, and its references rewritten to `location`. */
function withExternal(name: string, location: string): string {
  const dir = join(tmp, name);
  mkdirSync(dir, { recursive: true });
  copyFileSync(LLAMA, join(dir, 'src.onnx'));
  saveModel(loadModel(join(dir, 'src.onnx')), join(dir, 'model.onnx'), { externalizeThreshold: 1024 });
  const proto = decodeModelProto(readFileSync(join(dir, 'model.onnx')));
  for (const t of proto.graph!.initializer) for (const e of t.external_data) if (e.key === 'location') e.value = location;
  writeFileSync(join(dir, 'bad.onnx'), encodeModelProto(proto));
  return join(dir, 'bad.onnx');
}

beforeAll(async () => {
  writeFileSync(data(), '{"ids": [1, 2, 3, 4]}\n{"ids": [5, 6, 7]}\n');
  bad.missing = join(tmp, 'missing.onnx');
  bad.directory = join(tmp, 'a-folder');
  mkdirSync(bad.directory);
  bad.notOnnx = join(tmp, 'text.onnx');
  writeFileSync(bad.notOnnx, 'hello, this is not a protobuf\n');
  bad.empty = join(tmp, 'empty.onnx');
  writeFileSync(bad.empty, '');
  bad.truncated = join(tmp, 'truncated.onnx');
  writeFileSync(bad.truncated, readFileSync(LLAMA).subarray(0, 3000));
  bad.externalMissing = withExternal('ext-missing', 'gone.data');
  bad.externalEscapes = withExternal('ext-escape', '../../etc/passwd');
  const g = new Graph('g');
  const t = { tensor_type: { elem_type: 1, shape: { dim: [{ dim_value: 2 }] } } };
  const x = g.addInput(new Value('x', t));
  g.outputs = [g.addNode('Relu', [x], [new Value('y', t)]).output(0)];
  const m = new Model(g, 8);
  m.opsetImports = [{ domain: '', version: 17 }];
  bad.notDecoder = join(tmp, 'relu', 'model.onnx');
  saveModel(m, bad.notDecoder);
  compiled = join(tmp, 'compiled', 'model.onnx');
  expect((await runCli('compile', LLAMA, '-o', compiled, '--router-init', 'random', '-q')).code).toBe(0);
});

/** What each bad model must say (docs/commands.md, "Bad input"). */
const MODEL_ERRORS: [string, RegExp][] = [
  ['missing', /cannot read .*missing\.onnx: no such file/],
  ['directory', /a-folder is a directory, not an ONNX model file/],
  ['notOnnx', /text\.onnx: (corrupt or truncated ONNX protobuf|not an ONNX model)/],
  ['empty', /empty\.onnx: empty file, not an ONNX model/],
  ['truncated', /truncated\.onnx: corrupt or truncated ONNX protobuf/],
  ['externalMissing', /missing external data: 'gone\.data'/],
  ['externalEscapes', /escapes the model folder/],
  // inspect, compile, verify's original: the analysis; run, generate, bench: the session's I/O
  // check; verify's compiled side: the missing routing.
  [
    'notDecoder',
    /(not a decoder modc can handle: )?no residual stream: expected a token embedding|model has no 'input_ids' (or 'inputs_embeds' )?input \(inputs: x\)|the compiled model has no modc routing metadata/,
  ],
];

/** Every command, with the model argument at `M` (twice for the commands that take two models). */
const COMMANDS: [string, (m: string) => string[]][] = [
  ['inspect', (m) => ['inspect', m]],
  ['compile', (m) => ['compile', m, '-o', join(tmp, 'out', `${Math.random().toString(36).slice(2)}.onnx`), '--router-init', 'random']],
  ['run', (m) => ['run', m, '--ids', '1,2']],
  ['generate', (m) => ['generate', m, '--ids', '1,2', '--max-new', '2']],
  ['verify (original)', (m) => ['verify', m, compiled, '--steps', '0']],
  ['verify (compiled)', (m) => ['verify', LLAMA, m, '--steps', '0']],
  ['bench (original)', (m) => ['bench', m, compiled, '--prompt', '4', '--steps', '1', '--runs', '1', '--warmup', '0']],
  ['bench (compiled)', (m) => ['bench', LLAMA, m, '--prompt', '4', '--steps', '1', '--runs', '1', '--warmup', '0']],
  ['eval', (m) => ['eval', m, '--data', data()]],
  [
    'calibrate',
    (m) => ['calibrate', m, '--data', data(), '-o', join(tmp, 'routers', `${Math.random().toString(36).slice(2)}.safetensors`), '--target-compute', '0.8'],
  ],
  ['codegen', (m) => ['codegen', m, '-o', join(tmp, 'codegen', `${Math.random().toString(36).slice(2)}.ts`)]],
];

describe.each(MODEL_ERRORS)('bad model: %s', (which, pattern) => {
  it.each(COMMANDS)('%s', async (_name, args) => {
    const res = await runCli(...args(bad[which]!));
    expectOneLineError(res, 1, pattern);
  });
});

describe('bad usage, every command: exit 2, one line', () => {
  const models: Record<string, string[]> = {
    inspect: ['M'],
    compile: ['M', '-o', 'OUT', '--router-init', 'random'],
    run: ['M', '--ids', '1'],
    generate: ['M', '--ids', '1', '--max-new', '1'],
    verify: ['M', 'C'],
    bench: ['M', 'C'],
    eval: ['M', '--data', 'DATA'],
    calibrate: ['M', '--data', 'DATA', '-o', 'ROUTERS', '--target-compute', '0.8'],
    codegen: ['M', '-o', 'TS'],
  };
  const fill = (args: string[]) =>
    args.map((a) =>
      a === 'M'
        ? LLAMA
        : a === 'C'
          ? compiled
          : a === 'OUT'
            ? join(tmp, 'usage', 'o.onnx')
            : a === 'DATA'
              ? data()
              : a === 'ROUTERS'
                ? join(tmp, 'usage', 'r.safetensors')
                : a === 'TS'
                  ? join(tmp, 'usage', 's.ts')
                  : a,
    );
  it.each(Object.keys(models))('%s: an unknown flag, a missing or an extra model path', async (cmd) => {
    expectOneLineError(await runCli(cmd, ...fill(models[cmd]!), '--frobnicate'), 2, /frobnicate/);
    const positional = models[cmd]!.filter((a) => a === 'M' || a === 'C').length;
    expectOneLineError(await runCli(cmd, ...fill(models[cmd]!.filter((a) => a !== 'M' && a !== 'C'))), 2, /missing|expected/);
    expectOneLineError(await runCli(cmd, ...fill(models[cmd]!), LLAMA), 2, positional === 2 ? /expected two model paths/ : /expected one model path/);
  });

  it('an unknown command', async () => {
    expectOneLineError(await runCli('explode'), 2, /unknown command 'explode'/);
  });

  it.each([
    [['run', 'M', '--ids', '1,x'], /--ids: 'x' is not a token id/],
    [['run', 'M', '--ids', '1;;2'], /--ids: every row needs at least one id/],
    [['run', 'M'], /missing --ids/],
    [['run', 'M', '--ids', '1', '--pad', 'middle'], /--pad must be left or right/],
    [['run', 'M', '--ids', '1', '--ep', 'tpu'], /--ep must be cpu or cuda/],
    [['generate', 'M', '--ids', '1'], /--max-new must be a non-negative integer/],
    [['generate', 'M', '--ids', '1', '--max-new', '2', '--force', '1,a'], /--force: 'a' is not a token id/],
    [['verify', 'M', 'C', '--steps', '1.5'], /--steps must be an integer >= 0/],
    [['verify', 'M', 'C', '--tolerance', 'abc'], /--tolerance must be a number/],
    [['verify', 'M', 'C', '--ids', ''], /--ids: every row needs at least one id/],
    [['bench', 'M', 'C', '--runs', '0'], /--runs must be an integer >= 1/],
    [['bench', 'M', 'C', '--prompt', '-4'], /--prompt must be an integer >= 1/],
    [['compile', 'M', '--router-init', 'random'], /missing -o/],
    [['compile', 'M', '-o', 'OUT'], /nothing to do/],
    [['compile', 'M', '-o', 'OUT', '--router-init', 'random', '--threshold', '2'], /--threshold must be in \[0, 1\]/],
    [['compile', 'M', '-o', 'OUT', '--router-init', 'random', '--layers', '7'], /--layers names layer 7/],
    [['compile', 'M', '-o', 'OUT', '--passes', 'frobnicate'], /unknown pass 'frobnicate'/],
    [['compile', 'M', '-o', 'OUT', '--router-init', 'random', '--dump-after', 'nothing'], /--dump-after nothing: no such pass/],
  ])('%j', async (args, pattern) => {
    expectOneLineError(await runCli(...fill(args as string[])), 2, pattern as RegExp);
  });
});

describe('bad work input: exit 1, one line', () => {
  it('ids outside the vocabulary (run, generate, verify)', async () => {
    expectOneLineError(await runCli('run', LLAMA, '--ids', '1,99999'), 1, /99999.*vocabulary|vocabulary.*99999/);
    expectOneLineError(await runCli('generate', LLAMA, '--ids', '99999', '--max-new', '1'), 1, /vocabulary/);
    expectOneLineError(await runCli('generate', LLAMA, '--ids', '1', '--max-new', '1', '--force', '99999'), 1, /vocabulary/);
    expectOneLineError(await runCli('verify', LLAMA, compiled, '--ids', '99999', '--steps', '0'), 1, /vocabulary/);
  });

  it('--force with a length other than --max-new', async () => {
    expectOneLineError(await runCli('generate', LLAMA, '--ids', '1', '--max-new', '2', '--force', '3'), 1, /--force has 1 ids but --max-new is 2/);
  });

  it('a context longer than the position tables', async () => {
    expectOneLineError(await runCli('generate', fixture('gpt2-tiny'), '--ids', Array(600).fill(3).join(','), '--max-new', '1'), 1, /context|position/);
  });

  it('compile: the output is the input; a router file that does not fit; a file that is not safetensors', async () => {
    const p = join(tmp, 'same.onnx');
    copyFileSync(LLAMA, p);
    expectOneLineError(await runCli('compile', p, '-o', p, '--router-init', 'random'), 1, /refusing to overwrite the input model/);
    const routers = join(tmp, 'wide.safetensors');
    writeRouterFile(routers, [{ layer: 0, weight: new Float32Array(100), bias: 0 }]);
    expectOneLineError(
      await runCli('compile', LLAMA, '-o', join(tmp, 'r1', 'm.onnx'), '--routers', routers),
      1,
      /'router\.0\.weight' has shape \[100\], expected \[64\]/,
    );
    writeFileSync(routers, 'nonsense');
    expectOneLineError(await runCli('compile', LLAMA, '-o', join(tmp, 'r2', 'm.onnx'), '--routers', routers), 1, /not a safetensors file/);
    expectOneLineError(await runCli('compile', LLAMA, '-o', join(tmp, 'r3', 'm.onnx'), '--routers', join(tmp, 'none.safetensors')), 1, /none\.safetensors/);
    expect(existsSync(join(tmp, 'r1'))).toBe(false);
  });

  it('verify: a model modc did not compile; a compiled model made from another original', async () => {
    expectOneLineError(
      await runCli('verify', LLAMA, LLAMA, '--steps', '0'),
      1,
      /the compiled model has no modc routing metadata: was it compiled by modc compile\?/,
    );
    expectOneLineError(await runCli('verify', fixture('gpt2-tiny'), compiled, '--steps', '0'), 1, /was not compiled from/);
  });
});

describe('through the real command', () => {
  it('a failing command prints one stderr line, nothing on stdout, and exits 1', () => {
    // bin/modc.js runs dist/ (npm test builds it first).
    const res = spawnSync(process.execPath, [join(ROOT, 'bin', 'modc.js'), 'run', bad.truncated!, '--ids', '1'], { encoding: 'utf8' });
    expect(res.status).toBe(1);
    expect(res.stdout).toBe('');
    expect(res.stderr.trim().split('\n')).toHaveLength(1);
    expect(res.stderr).toMatch(/^modc: .*truncated\.onnx: corrupt or truncated ONNX protobuf/);
  });
});
