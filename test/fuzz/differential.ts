/**
 * The fuzzer's differential check: for a mutated model that ONNX Runtime loads and runs, modc's
 * compile must keep its meaning, as `modc verify` checks it:
 *
 * - anchor: the original compiled with every token selected, ungated, reproduces the original;
 * - semantics: a compile with seeded random routers agrees with the reference executor;
 *
 * each on a 3-row prompt, then two decode steps, within 1e-4 (fp32) or 1e-2 (fp16), scaled up
 * with the original's largest |logit| beyond 100: float32 keeps about 7 digits, so 1e-4 at
 * logits of 100 is a relative 1e-6, and a mutated weight can make logits of 1e20 whose rounding
 * alone differs by far more than 1e-4 between two correct compiles. A check that fails, or a
 * compiled model that fails to run where the original runs, is a `mismatch`.
 * A model modc refuses, or whose original does not run (or gives non-finite logits), is not
 * checked: that is the mutation's doing, and the note says so.
 */
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { analyzeDecoder } from '../../compiler/analysis/analyze.js';
import { ModcError } from '../../compiler/core/errors.js';
import { loadModel } from '../../compiler/core/io/load.js';
import { saveModel } from '../../compiler/core/io/save.js';
import type { Model } from '../../compiler/core/ir/model.js';
import { readRoutingMetadata } from '../../compiler/metadata/routing-metadata.js';
import { decoderIo, resolvePadSide } from '../../compiler/metadata/decoder-io.js';
import { compile } from '../../compiler/passes/compile.js';
import { verifyCompiled } from '../../compiler/apps/verify/verify.js';
import { lastPosition, ModSession } from '../../compiler/runtime/session.js';
import type { RoutedPart, RoutingMode } from '../../compiler/routing/routing-plan.js';
import type { Rng } from './mutate.js';

export type DiffResult = { kind: 'passed'; what: string } | { kind: 'skipped'; note: string } | { kind: 'mismatch'; message: string };

/** Decode steps after the prompt. */
export const DIFF_STEPS = 2;

const message = (e: unknown) => ((e as Error)?.message ?? String(e)).split('\n')[0]!;

/** verify's default prompt, its ids taken modulo the vocabulary. */
function promptFor(vocab: number | null): number[][] {
  const rows = [
    [5, 6, 7, 8, 9, 10, 11],
    [12, 13, 14],
    [15, 16, 17, 18, 19],
  ];
  return vocab && vocab < 20 ? rows.map((r) => r.map((id) => id % vocab)) : rows;
}

/**
 * Runs the differential check on `input` (a model file), working in `dir`. `afterCompile` edits
 * the compiled model before it is saved (the check's own test breaks it on purpose).
 */
export async function differential(input: string, dir: string, rng: Rng, afterCompile?: (compiled: Model) => void): Promise<DiffResult> {
  const granularity = rng.pick<RoutedPart>(['block', 'attention', 'mlp'])!;
  const mode = rng.pick<RoutingMode>(['threshold', 'topk'])!;
  const gated = rng.chance(0.5);
  const seed = rng.int(100);
  const what = `random routers seed ${seed}, ${mode}, ${gated ? 'gated' : 'ungated'}, ${granularity}`;
  let prompt: number[][];
  let tolerance: number;
  let half: boolean;
  try {
    const model = loadModel(input);
    if (readRoutingMetadata(model)) return { kind: 'skipped', note: 'the input is a compiled model' };
    half = analyzeDecoder(model).dtype === 'float16';
  } catch (e) {
    if (e instanceof ModcError) return { kind: 'skipped', note: `refused: ${message(e)}` };
    throw e;
  }
  try {
    const model = loadModel(input);
    const io = decoderIo(model);
    prompt = promptFor(io.vocabSize);
    if (io.maxPositions !== null && io.maxPositions < Math.max(...prompt.map((r) => r.length)) + DIFF_STEPS)
      return { kind: 'skipped', note: `the model has ${io.maxPositions} positions` };
    // The original must run, finitely, on the prompt: otherwise there is nothing to compare.
    const original = await ModSession.create(input);
    const rows = io.unpaddable ? prompt.map((r) => r.slice(0, 3)) : prompt;
    const logits = [(await original.forward(rows, { pad: resolvePadSide(io, undefined) })).data];
    for (let t = 0; t < DIFF_STEPS; t++) logits.push(...lastPosition(await original.step(rows.map(() => 1))));
    if (logits.some((l) => l.some((v) => !Number.isFinite(v)))) return { kind: 'skipped', note: 'the original gives non-finite logits' };
    const scale = Math.max(...logits.map((l) => l.reduce((m, v) => Math.max(m, Math.abs(v)), 0)));
    tolerance = (half ? 1e-2 : 1e-4) * Math.max(1, scale / 100);
  } catch (e) {
    return { kind: 'skipped', note: `the original does not run: ${message(e)}` };
  }
  const out = join(dir, 'compiled', 'model.onnx');
  try {
    const model = loadModel(input);
    compile(model, { routers: { kind: 'random', seed }, mode, threshold: 0.5, capacity: 0.5, gated, granularity });
    afterCompile?.(model);
    mkdirSync(join(dir, 'compiled'), { recursive: true });
    saveModel(model, out);
  } catch (e) {
    if (e instanceof ModcError) return { kind: 'skipped', note: `compile refused: ${message(e)}` };
    throw e;
  }
  try {
    const report = await verifyCompiled(input, out, { prompt, steps: DIFF_STEPS, defaultPrompt: true, tolerance });
    if (report.passed) return { kind: 'passed', what };
    const failed = report.checks
      .filter((c) => !c.passed)
      .map(
        (c) =>
          `${c.name}: max |logit diff| ${c.maxDiff.map((d) => d.toExponential(2)).join(', ')} (tolerance ${report.tolerance})${c.cacheLengthsMatch ? '' : ', cache lengths differ'}${c.kvBytesMatch ? '' : ', kv bytes differ'}`,
      );
    return { kind: 'mismatch', message: `${what}: ${failed.join('; ')}` };
  } catch (e) {
    if (e instanceof ModcError) return { kind: 'mismatch', message: `${what}: verify failed: ${message(e)}` };
    throw e;
  }
}
