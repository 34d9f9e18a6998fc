/**
 * Seed models for the fuzzer: every fixture, plus compiled versions of two (so the mutators also
 * meet modc functions, If-wrapped layers and routing metadata).
 */
import { existsSync, mkdirSync, readdirSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { analyzeDecoder } from '../../compiler/analysis/analyze.js';
import { loadModel } from '../../compiler/core/io/load.js';
import { saveModel } from '../../compiler/core/io/save.js';
import { runPipeline } from '../../compiler/passes/pass-manager.js';
import { planRouting } from '../../compiler/routing/routing-plan.js';
import { modPipeline } from '../../compiler/passes/pipeline.js';

export const FIXTURES = resolve(import.meta.dirname, '../../fixtures');

/** Folders under `root` holding a model.onnx. */
export function modelFolders(root: string): string[] {
  if (!existsSync(root)) return [];
  return readdirSync(root)
    .sort()
    .map((e) => join(root, e))
    .filter((d) => existsSync(join(d, 'model.onnx')));
}

/** Bytes of a model folder's files (model and sidecars). */
function folderBytes(dir: string): number {
  return readdirSync(dir).reduce((a, e) => a + statSync(join(dir, e)).size, 0);
}

/**
 * The fixtures (those under `maxBytes`, when given: the short run skips the larger ones), plus
 * compiled seeds written under `scratch`.
 */
export function seedModels(scratch: string, extra: string[] = [], maxBytes = Infinity): string[] {
  const seeds = [...modelFolders(FIXTURES).filter((d) => folderBytes(d) <= maxBytes), ...extra];
  for (const [name, inlineOps] of [
    ['llama-tiny', false],
    ['gpt2-tiny', true],
    ['genai-tiny', false],
  ] as const) {
    const src = join(FIXTURES, name, 'model.onnx');
    if (!existsSync(src)) continue;
    const dir = join(scratch, `${name}-mod`);
    mkdirSync(dir, { recursive: true });
    const model = loadModel(src);
    const s = analyzeDecoder(model);
    const plan = planRouting({
      numLayers: s.layers.length,
      hiddenSize: s.hiddenSize,
      routers: { kind: 'random', seed: 1 },
      mode: inlineOps ? 'topk' : 'threshold',
    });
    runPipeline(model, modPipeline({ plan, inlineOps }));
    saveModel(model, join(dir, 'model.onnx'));
    seeds.push(dir);
  }
  return seeds;
}
