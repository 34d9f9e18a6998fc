/**
 * `--ep cuda` where the CUDA execution provider cannot run: one line naming what is missing, exit
 * code 1, from every command that takes --ep. On a machine with the provider installed the same
 * commands must run instead.
 */
import { mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { cudaProviderProblem, ortBindingDir } from '../compiler/runtime/cuda.js';
import { expectOneLineError, ROOT, runCli, tempDir, type CliResult } from './helpers.js';

const tmp = tempDir('modc-cuda-ep');
const LLAMA = join(ROOT, 'fixtures', 'llama-tiny', 'model.onnx');
const PROBLEM = cudaProviderProblem();

describe('the CUDA provider check', () => {
  it('names the provider libraries missing from a folder', () => {
    const dir = join(tmp, 'empty');
    mkdirSync(dir, { recursive: true });
    expect(cudaProviderProblem(dir)).toMatch(
      /not installed: libonnxruntime_providers_shared\.so and libonnxruntime_providers_cuda\.so are missing from .*empty \(see docs\/serving\.md, "CUDA"\)/,
    );
    writeFileSync(join(dir, 'libonnxruntime_providers_shared.so'), 'x');
    expect(cudaProviderProblem(dir)).toMatch(/not installed: libonnxruntime_providers_cuda\.so is missing from/);
  });

  it('names a provider library that does not load, and why', () => {
    const dir = join(tmp, 'broken');
    mkdirSync(dir, { recursive: true });
    for (const n of ['shared', 'cuda']) writeFileSync(join(dir, `libonnxruntime_providers_${n}.so`), 'not a library');
    expect(cudaProviderProblem(dir)).toMatch(/cannot load libonnxruntime_providers_shared\.so: .*(too short|invalid ELF|file)/);
  });

  it('accepts libraries that load', () => {
    const dir = join(tmp, 'loadable');
    mkdirSync(dir, { recursive: true });
    // Any shared library that loads stands in for the provider here: the check is whether the loader can resolve it.
    const real = join(ortBindingDir(), 'libonnxruntime.so.1');
    for (const n of ['shared', 'cuda']) symlinkSync(real, join(dir, `libonnxruntime_providers_${n}.so`));
    expect(cudaProviderProblem(dir)).toBeNull();
  });

  it("looks in onnxruntime-node's binding folder", () => {
    expect(ortBindingDir()).toMatch(/onnxruntime-node[/\\]bin[/\\]napi-v6[/\\]/);
  });
});

describe('--ep cuda on every command', () => {
  const compiled = join(tmp, 'mod', 'model.onnx');

  /** Without the provider: the check's own line, exit 1. With it: the command runs. */
  function expectCudaOutcome(res: CliResult): void {
    if (PROBLEM) expectOneLineError(res, 1, /CUDA execution provider/);
    else expect(res.code, res.stderr).toBe(0);
  }

  it('run, generate, verify and bench', async () => {
    expect((await runCli('compile', LLAMA, '-o', compiled, '--router-init', 'random', '-q')).code).toBe(0);
    expectCudaOutcome(await runCli('run', compiled, '--ids', '1,2,3', '--ep', 'cuda'));
    expectCudaOutcome(await runCli('generate', compiled, '--ids', '1,2,3', '--max-new', '2', '--ep', 'cuda'));
    expectCudaOutcome(await runCli('verify', LLAMA, compiled, '--steps', '1', '--ep', 'cuda'));
    expectCudaOutcome(await runCli('bench', LLAMA, compiled, '--prompt', '4', '--steps', '1', '--runs', '1', '--warmup', '0', '--ep', 'cuda'));
    if (PROBLEM) expect((await runCli('run', compiled, '--ids', '1,2,3', '--ep', 'cuda')).stderr).toContain(PROBLEM);
  });

  it('an unknown provider is a usage error', async () => {
    expectOneLineError(await runCli('run', LLAMA, '--ids', '1', '--ep', 'tpu'), 2, /--ep must be cpu or cuda/);
  });
});
