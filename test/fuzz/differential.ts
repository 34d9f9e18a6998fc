/**
 * The fuzzer's differential check: for a mutated model that ONNX Runtime loads and runs, modc's
 * compile must keep its meaning, as `modc verify` checks it:
 *
 * - anchor: the original compiled with every token selected, ungated, reproduces the original;
 * - semantics: a compile with seeded random routers agrees with the reference executor;
 *
 * each on a 3-row prompt, then two decode steps, within 1e-4 (fp32) or 1e-2 (fp16), scaled up
 * with the original's largest |logit| beyond 100 (fp16: beyond 5): float32 keeps about 7
 * digits, so 1e-4 at logits of 100 is a relative 1e-6 (float16: 3 digits, 2e-3 is two units in
 * the last place), and a mutated weight can make logits of 1e20 whose rounding alone differs by
 * far more than 1e-4 between two correct compiles. A check that fails, or a
 * compiled model that fails to run where the original runs, is a `mismatch`, unless the first
 * routing decision where the compiled model and the reference part ways is a near tie: a token
 * whose router score lies within rounding (1e-4, float16 models 2e-2) of the selection boundary,
 * which the two round to different sides (the compiled model runs the selected tokens batched,
 * the reference row by row, so their streams differ by rounding); every later decision then
 * follows from different caches. Such a case is not checked, and the note gives the scores.
 * A model modc refuses, whose original does not run (or gives non-finite logits), or whose rows
 * depend on the rest of the batch (a row run alone gives other logits: MoD runs a converted
 * layer's rows one at a time, as the reference does), is not checked: that is the mutation's
 * doing, and the note says so.
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
import { lastRealOf, routingPlanOf, verifyCompiled } from '../../compiler/apps/verify/verify.js';
import { ModReference } from '../../compiler/apps/reference/mod-reference.js';
import { DataType } from '../../compiler/core/ir/dtype.js';
import type { ort } from '../../compiler/runtime/ort.js';
import { argmax, lastPosition, ModSession } from '../../compiler/runtime/session.js';
import { describeLayerPart, type RoutedPart, type RoutingMode } from '../../compiler/routing/routing-plan.js';
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

/** The stage while the original runs: ONNX Runtime dying there is the mutated input's doing (pool.ts). */
export const DIFF_ORIGINAL_STAGE = 'differential-original';

export interface DiffOptions {
  /** Edits the compiled model before it is saved (the check's own test breaks it on purpose). */
  afterCompile?: (compiled: Model) => void;
  /** Hears DIFF_ORIGINAL_STAGE, then 'differential'. */
  onStage?: (name: string) => void;
  /** The routing to compile with, instead of the one `rng` draws. */
  routing?: { granularity: RoutedPart; mode: RoutingMode; gated: boolean; seed: number };
}

/** Runs the differential check on `input` (a model file), working in `dir`. */
export async function differential(input: string, dir: string, rng: Rng, opts: DiffOptions = {}): Promise<DiffResult> {
  const onStage = opts.onStage ?? (() => {});
  const drawn = {
    granularity: rng.pick<RoutedPart>(['block', 'attention', 'mlp'])!,
    mode: rng.pick<RoutingMode>(['threshold', 'topk'])!,
    gated: rng.chance(0.5),
    seed: rng.int(100),
  };
  const { granularity, mode, gated, seed } = opts.routing ?? drawn;
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
  onStage(DIFF_ORIGINAL_STAGE);
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
    tolerance = half ? 1e-2 * Math.max(1, scale / 5) : 1e-4 * Math.max(1, scale / 100);
    // MoD's semantics run a converted layer's rows one at a time (the reference executor does):
    // a model whose rows depend on the rest of the batch has none to check against.
    const pad = resolvePadSide(io, undefined);
    const together = await (await ModSession.create(input)).forward(rows, { pad });
    for (const [b, row] of rows.entries()) {
      const alone = await (await ModSession.create(input)).forward([row]);
      const S = together.dims[1];
      const V = together.dims[2];
      const start = pad === 'left' ? S - row.length : 0;
      let worst = 0;
      for (let t = 0; t < row.length; t++)
        for (let v = 0; v < V; v++) worst = Math.max(worst, Math.abs(alone.data[t * V + v]! - together.data[(b * S + start + t) * V + v]!));
      if (worst > tolerance) return { kind: 'skipped', note: `the original's rows depend on the batch (row ${b} alone differs by ${worst.toExponential(2)})` };
    }
  } catch (e) {
    return { kind: 'skipped', note: `the original does not run: ${message(e)}` };
  }
  onStage('differential');
  const out = join(dir, 'compiled', 'model.onnx');
  try {
    const model = loadModel(input);
    compile(model, { routers: { kind: 'random', seed }, mode, threshold: 0.5, capacity: 0.5, gated, granularity });
    opts.afterCompile?.(model);
    mkdirSync(join(dir, 'compiled'), { recursive: true });
    saveModel(model, out);
  } catch (e) {
    if (e instanceof ModcError) return { kind: 'skipped', note: `compile refused: ${message(e)}` };
    throw e;
  }
  try {
    const report = await verifyCompiled(input, out, { prompt, steps: DIFF_STEPS, defaultPrompt: true, tolerance });
    if (report.passed) return { kind: 'passed', what };
    const tie = report.checks[0]!.passed ? null : await nearTie(input, out, join(dir, 'tie'), prompt, half ? 2e-2 : 1e-4);
    if (tie) return { kind: 'skipped', note: `a routing near tie (${what}): ${tie}` };
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

/**
 * Where the compiled model and the reference first select differently (calls in order, parts in
 * layer order), if every token they disagree on has a router score within `eps` of the
 * selection boundary: threshold p at logit(p), top-k halfway between the reference's lowest
 * selected and highest unselected score (a decode step's fallback, r >= 0.5, at 0). Null when
 * they select alike throughout or first part ways away from the boundary.
 */
async function nearTie(input: string, compiledPath: string, dir: string, prompt: number[][], eps: number): Promise<string | null> {
  const model = loadModel(compiledPath);
  const meta = readRoutingMetadata(model)!;
  const parts = [...meta.layers].sort((a, b) => a.layer - b.layer || Number(a.part === 'mlp') - Number(b.part === 'mlp'));
  for (const l of parts) {
    const v = model.graph.findValue(l.selected ?? '');
    if (!v) return null;
    if (!model.graph.outputs.includes(v)) {
      v.type = { tensor_type: { elem_type: DataType.BOOL } };
      model.graph.outputs.push(v);
    }
  }
  const exposed = join(dir, 'exposed', 'model.onnx');
  saveModel(model, exposed);
  const plan = routingPlanOf(loadModel(exposed));
  const io = decoderIo(loadModel(input));
  const pad = resolvePadSide(io, undefined);
  const shortest = Math.min(...prompt.map((r) => r.length));
  const rows = io.unpaddable ? prompt.map((r) => r.slice(0, shortest)) : prompt;
  const mod = await ModSession.create(exposed);
  const ref = await ModReference.create(input, plan, join(dir, 'reference'));
  try {
    const first = await mod.forward(rows, { pad });
    await ref.forward(rows, { pad });
    let next = lastRealOf(first, rows, pad).map(argmax);
    for (let call = 0; call <= DIFF_STEPS; call++) {
      if (call > 0) {
        const fed = next;
        next = lastPosition(await mod.step(fed)).map(argmax);
        await ref.step(fed);
      }
      for (const l of parts) {
        const key = describeLayerPart(l);
        const t = mod.lastOutputs[l.selected!] as ort.Tensor;
        const [B, S] = t.dims as [number, number];
        const picked = (b: number) => [...Array(S).keys()].filter((s) => (t.data as Uint8Array)[b * S + s]);
        const wanted = ref.selections[call]!.get(key);
        const scores = ref.scores[call]!.get(key);
        if (!wanted || !scores) return null;
        for (let b = 0; b < B; b++) {
          const [got, want] = [picked(b), wanted[b]!];
          if (JSON.stringify(got) === JSON.stringify(want)) continue;
          // The row's real tokens of the call, in order, as the reference scored them.
          const n = call === 0 ? rows[b]!.length : 1;
          const real = Array.from({ length: n }, (_, i) => (call > 0 ? 0 : pad === 'right' ? i : S - n + i));
          const score = (s: number) => scores[b]![real.indexOf(s)];
          const part = plan.layers.find((p) => p.layer === l.layer && p.part === l.part)!;
          let boundary: number;
          if (plan.mode === 'threshold') boundary = Math.log(part.threshold / (1 - part.threshold));
          else if (call > 0) boundary = 0;
          else {
            const inside = want.map(score).filter((x): x is number => x !== undefined);
            const outside = real
              .filter((s) => !want.includes(s))
              .map(score)
              .filter((x): x is number => x !== undefined);
            if (!inside.length || !outside.length) return null;
            boundary = (Math.min(...inside) + Math.max(...outside)) / 2;
          }
          const differ = [...got.filter((s) => !want.includes(s)), ...want.filter((s) => !got.includes(s))];
          const far = differ.find((s) => score(s) === undefined || Math.abs(score(s)! - boundary) > eps);
          if (far !== undefined) return null;
          return `layer ${key}, call ${call}, row ${b}: the compiled model selects [${got.join(', ')}], the reference [${want.join(', ')}]; scores ${differ
            .map((s) => score(s)!.toPrecision(4))
            .join(', ')} against a boundary of ${boundary.toPrecision(4)}`;
        }
      }
    }
    return null;
  } finally {
    await ref.release();
  }
}
