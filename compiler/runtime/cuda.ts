/**
 * Whether the CUDA execution provider can load, checked before ONNX Runtime tries (ORT's own
 * failure is a multi-line native log plus "Failed to load shared library", naming nothing).
 *
 * onnxruntime-node loads `libonnxruntime_providers_shared` and `libonnxruntime_providers_cuda`
 * from the folder of its native binding. They are not in the npm package (docs/serving.md, "CUDA"), and
 * the CUDA one needs the CUDA runtime, cuBLAS and cuDNN libraries on the loader's path.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { constants } from 'node:os';
import { dirname, join } from 'node:path';

const LIBRARY: Record<string, (name: string) => string> = {
  linux: (n) => `lib${n}.so`,
  win32: (n) => `${n}.dll`,
};

/** The folder holding onnxruntime-node's native binding for this platform. */
export function ortBindingDir(): string {
  const entry = createRequire(import.meta.url).resolve('onnxruntime-node');
  return join(dirname(entry), '..', 'bin', 'napi-v6', process.platform, process.arch);
}

/**
 * Why the CUDA execution provider cannot be used from `dir`, in one line, or null when its
 * libraries are there and load (a GPU and driver are checked by ORT when a session starts).
 */
export function cudaProviderProblem(dir = ortBindingDir()): string | null {
  const name = LIBRARY[process.platform];
  if (!name) return `the CUDA execution provider is available on Linux and Windows only, not on ${process.platform}`;
  const files = ['onnxruntime_providers_shared', 'onnxruntime_providers_cuda'].map((n) => join(dir, name(n)));
  const missing = files.filter((f) => !existsSync(f));
  if (missing.length) {
    return `the CUDA execution provider is not installed: ${missing.map((f) => f.slice(dir.length + 1)).join(' and ')} ${missing.length > 1 ? 'are' : 'is'} missing from ${dir} (see docs/serving.md, "CUDA")`;
  }
  for (const file of files) {
    try {
      process.dlopen({ exports: {} }, file, constants.dlopen.RTLD_NOW | constants.dlopen.RTLD_GLOBAL);
    } catch (e) {
      const msg = (e as Error).message.split('\n')[0]!;
      // A library that loads is still not a Node addon: that error means it loaded fine.
      if (/did not self-register|Module did not|napi_register_module/i.test(msg)) continue;
      return `the CUDA execution provider cannot load ${file.slice(dir.length + 1)}: ${msg.replace(`${file}: `, '')} (put the CUDA and cuDNN libraries it needs on ${process.platform === 'win32' ? 'PATH' : 'LD_LIBRARY_PATH'}; see docs/serving.md, "CUDA")`;
    }
  }
  return null;
}
