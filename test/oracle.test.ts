/**
 * The compiled torch fixtures agree with an independent oracle of SPEC.md: a torch implementation
 * written from the spec (fixtures/oracle/oracle.py), which also made the router files, so nothing
 * expected here comes from the code under test. Cases: llama-tiny, gpt2-tiny and neox-tiny;
 * threshold and top-k, gated and ungated, batch 1 and batch 3 with left or right padding, whole
 * blocks, attention, MLP, both parts and a mix of granularities, key/value routing (alone, beside a
 * routed MLP with or without a surrogate, and with sinks and window from the file), F32 and BF16 router files,
 * mode/gated/capacities from the file's metadata, and MLP parts with a linear surrogate (routed,
 * gated and ungated, beside other parts, and replaced by it with no router). Per case: compile
 * with `--routers` that file (library API), run the prefill and three decode steps, and compare
 * - the logits at every real position (a fixed slice of 32 vocabulary ids) within 1e-4 (SPEC.md's
 *   fp32 tolerance), and
 * - each layer's cache length per row,
 * - in the prefill, each routed part's token selection (the compiled model's own selection
 *   values, made outputs), and that padding is never selected.
 * Each case also checks that the oracle's routed logits differ from the original model's (run in
 * ONNX Runtime here) by far more than the tolerance, so a compiler that ignored routing fails.
 * Some cases sit exactly on a boundary that SPEC.md alone decides (`exactDecisions`): zero routers
 * (every score 0: top-k ties keep the earlier tokens, r = 0.5 is selected at p = 0.5 and in a
 * decode step) and repeated ids at layer 0 of the rotary models (equal scores at the top-k cut).
 * Each cases.json names the sha256 of the files that generated it and of its router files; a
 * changed oracle, export.py or router file without regenerated cases fails here.
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { runPipeline } from '../compiler/passes/pass-manager.js';
import { exposeSelections, type Selection } from '../compiler/apps/eval/selection.js';
import { readRoutingMetadata } from '../compiler/metadata/routing-metadata.js';
import { planRouting, type RoutingMode } from '../compiler/routing/routing-plan.js';
import { decoderIo } from '../compiler/metadata/decoder-io.js';
import { createSession, emptyTensor, ort } from '../compiler/runtime/ort.js';
import { ModSession, padRows, promptPositions, typed, type Logits } from '../compiler/runtime/session.js';
import { modPipeline } from '../compiler/passes/pipeline.js';
import { contractModels, ROOT, tempDir } from './helpers.js';

interface OracleCall {
  /** [row][real position of this call][slice id] */
  logits: number[][][];
  /** [layer][row] */
  cacheLengths: number[][];
  selected: { layer: number; part: string; rows: boolean[][] }[];
}
interface OracleCase {
  name: string;
  routers: string;
  granularity: string;
  /** What the case exercises beyond whole-block routing from F32 tensors and flags. */
  requires: string[]; // informational: sub-layer, bf16, router-metadata
  /** fromFile: compiled with no routing flag (mode, gated and capacities from the file's metadata). */
  routing: { mode: RoutingMode; gated: boolean; threshold?: number; capacity?: number; fromFile?: boolean; kv?: { sinks: number; window: number } };
  pad: 'left' | 'right';
  prompt: number[][];
  steps: number[][];
  /** Decisions exactly on their boundary (equal scores at the top-k cut, r = p), decided by SPEC.md's rules alone. */
  exactDecisions: number;
  calls: OracleCall[];
}
interface OracleFile {
  model: string;
  vocabSlice: number[];
  /** sha256 of each file that generated the cases, by path from the repository root. */
  generatedBy: Record<string, string>;
  /** sha256 of each router file the cases were computed with, by file name. */
  routerFiles: Record<string, string>;
  cases: OracleCase[];
}

const TOLERANCE = 1e-4;
/** The oracle's routed logits must differ from the original model's by at least this much. */
const MIN_EFFECT = 1e-2;
const tmp = tempDir('modc-oracle');
let counter = 0;

interface Compiled {
  path: string;
  /** The same model with each routed part's selection value as an extra output. */
  instrumented: { path: string; selections: Selection[]; session?: ort.InferenceSession };
}

function compile(source: string, routers: string, c: OracleCase): Compiled {
  const model = loadModel(source);
  const s = analyzeDecoder(model);
  const flags = c.routing.fromFile
    ? {}
    : {
        mode: c.routing.mode,
        gated: c.routing.gated,
        threshold: c.routing.threshold,
        capacity: c.routing.capacity,
        ...(c.routing.kv ? { kvSinks: c.routing.kv.sinks, kvWindow: c.routing.kv.window } : {}),
      };
  const plan = planRouting({ numLayers: s.layers.length, hiddenSize: s.hiddenSize, routers: { kind: 'file', path: routers }, ...flags });
  runPipeline(model, modPipeline({ plan }));
  const dir = join(tmp, `c${counter++}`);
  const path = join(dir, 'model.onnx');
  saveModel(model, path);
  const selections = exposeSelections(model, readRoutingMetadata(model)!);
  const instrumented = join(dir, 'selections.onnx');
  saveModel(model, instrumented);
  return { path, instrumented: { path: instrumented, selections } };
}

/** Per row, per real position of the call, the logits at the slice ids: [row][position][id]. */
function realSlices(l: Logits, lengths: number[], pad: 'left' | 'right', slice: number[]): number[][][] {
  const [B, S, V] = l.dims;
  return Array.from({ length: B }, (_, r) => {
    const n = lengths[r]!;
    const first = pad === 'left' ? S - n : 0;
    return Array.from({ length: n }, (_, t) => slice.map((id) => l.data[(r * S + first + t) * V + id]!));
  });
}

/** Largest |a - b| over matching entries; NaN or a shape mismatch gives Infinity. */
function worst(a: number[][][], b: number[][][]): number {
  if (JSON.stringify(a.map((r) => r.map((p) => p.length))) !== JSON.stringify(b.map((r) => r.map((p) => p.length)))) return Infinity;
  let w = 0;
  a.forEach((row, r) =>
    row.forEach((pos, t) =>
      pos.forEach((v, i) => {
        const d = Math.abs(v - b[r]![t]![i]!);
        w = Number.isNaN(d) ? Infinity : Math.max(w, d);
      }),
    ),
  );
  return w;
}

/** Runs a model over the case's prompt and steps: per call, the real positions' logit slices and the cache lengths. */
async function runCase(path: string, c: OracleCase, slice: number[]): Promise<{ logits: number[][][]; cacheLengths: number[][] }[]> {
  const session = await ModSession.create(path);
  const out = [
    {
      logits: realSlices(
        await session.forward(c.prompt, { pad: c.pad }),
        c.prompt.map((r) => r.length),
        c.pad,
        slice,
      ),
      cacheLengths: session.layerCacheLengths(),
    },
  ];
  for (const step of c.steps)
    out.push({
      logits: realSlices(
        await session.step(step),
        step.map(() => 1),
        'left',
        slice,
      ),
      cacheLengths: session.layerCacheLengths(),
    });
  return out;
}

/**
 * The compiled model's own token selections in the prefill (the bool [B, S] values named in its
 * modc.routing metadata, made graph outputs): per routed part, per row, the real positions'
 * selections; also fails if a padding position is selected.
 */
async function prefillSelections(compiled: Compiled, c: OracleCase): Promise<Map<string, boolean[][]>> {
  const { selections } = compiled.instrumented;
  // A model whose MLPs are all replaced by their surrogates has no router and selects nothing.
  if (selections.length === 0) return new Map();
  const io = decoderIo(loadModel(compiled.path));
  const { ids, mask, width } = padRows(c.prompt, c.pad);
  const B = c.prompt.length;
  const feeds: Record<string, ort.Tensor> = { [io.inputIds.name]: typed(io.inputIds.dtype, ids, [B, width]) };
  if (io.attentionMask) feeds[io.attentionMask.name] = typed(io.attentionMask.dtype, mask.flat(), [B, width]);
  if (io.positionIds) feeds[io.positionIds.name] = typed(io.positionIds.dtype, promptPositions(mask), [B, width]);
  for (const b of io.kv) {
    feeds[b.pastKey] = emptyTensor(b.dtype, [B, b.numHeads, 0, b.headSize]);
    if (b.pastValue) feeds[b.pastValue] = emptyTensor(b.dtype, [B, b.numHeads, 0, b.headSize]);
    if (b.pastLength) feeds[b.pastLength] = typed('int64', Array(B).fill(0), [B]);
    if (b.pastPositions) feeds[b.pastPositions] = typed('int64', [], [B, 0]);
    if (b.pastValid) feeds[b.pastValid] = new ort.Tensor('bool', new Uint8Array(0), [B, 0]);
  }
  compiled.instrumented.session ??= await createSession(compiled.instrumented.path);
  const out = await compiled.instrumented.session.run(
    feeds,
    selections.map((s) => s.output),
  );
  const result = new Map<string, boolean[][]>();
  for (const s of selections) {
    const data = (out[s.output] as ort.Tensor).data as Uint8Array;
    expect(data.length, `layer ${s.layer} ${s.part}: selection [B, S]`).toBe(B * width);
    result.set(
      `${s.layer}/${s.part}`,
      mask.map((m, b) =>
        m.flatMap((real, t) => {
          const chosen = data[b * width + t] !== 0;
          if (real === 0) expect(chosen, `layer ${s.layer} ${s.part}: padding (row ${b}, column ${t}) is never selected`).toBe(false);
          return real === 1 ? [chosen] : [];
        }),
      ),
    );
  }
  return result;
}

/** The fixtures the oracle covers; `npm test` runs those in QUICK_MODELS, `npm run test:slow` the others. */
const ORACLE_MODELS = ['llama-tiny', 'gpt2-tiny', 'neox-tiny'];
const models = contractModels()
  .map((m) => m.name.replace(/^fixtures\//, ''))
  .filter((n) => ORACLE_MODELS.includes(n));

it('runs on at least one of its fixtures in this test project', () => {
  expect(models.length).toBeGreaterThan(0);
});

const sha256 = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');

it.each(ORACLE_MODELS)('%s: cases.json is what the committed oracle.py and export.py wrote, with the committed router files', (name) => {
  const oracle = JSON.parse(readFileSync(join(ROOT, 'fixtures', 'oracle', name, 'cases.json'), 'utf8')) as OracleFile;
  expect(Object.keys(oracle.generatedBy).sort()).toEqual(['fixtures/oracle/oracle.py', 'fixtures/torch/export.py']);
  for (const [path, sha] of Object.entries(oracle.generatedBy))
    expect(sha256(join(ROOT, path)), `${path} changed since the cases were generated: rerun /usr/bin/python3 fixtures/oracle/oracle.py`).toBe(sha);
  const files = [...new Set(oracle.cases.map((c) => c.routers))].sort();
  expect(Object.keys(oracle.routerFiles).sort()).toEqual(files);
  for (const [file, sha] of Object.entries(oracle.routerFiles))
    expect(sha256(join(ROOT, 'fixtures', 'oracle', name, file)), `${name}/${file} is not the file the cases were computed with`).toBe(sha);
});

describe.each(models)('oracle %s', (name) => {
  const oracle = JSON.parse(readFileSync(join(ROOT, 'fixtures', 'oracle', name, 'cases.json'), 'utf8')) as OracleFile;
  const source = join(ROOT, 'fixtures', name, 'model.onnx');
  const cases = oracle.cases;
  /** The original model's outputs per (prompt, steps, padding side). */
  const original = new Map<string, Awaited<ReturnType<typeof runCase>>>();
  /** Compiled model path per (router file, routing). */
  const compiledFor = new Map<string, Compiled>();

  it('covers threshold and top-k, gated and ungated, both padding sides, every granularity, BF16, file metadata and surrogates', () => {
    const block = cases.filter((c) => c.granularity === 'block');
    expect([...new Set(block.map((c) => `${c.routing.mode}/${c.routing.gated}`))].sort()).toEqual([
      'threshold/false',
      'threshold/true',
      'topk/false',
      'topk/true',
    ]);
    expect([...new Set(block.map((c) => c.pad))].sort()).toEqual(['left', 'right']);
    expect([...new Set(cases.map((c) => c.granularity))].sort()).toEqual(['attention', 'block', 'kv', 'mixed', 'mlp']);
    expect([...new Set(cases.flatMap((c) => c.requires))].sort()).toEqual(['bf16', 'kv', 'router-metadata', 'sub-layer', 'surrogate']);
    // Surrogates: routed MLP parts gated and ungated, threshold and top-k, and a case with no router at all.
    const surrogate = cases.filter((c) => c.requires.includes('surrogate'));
    expect([...new Set(surrogate.map((c) => `${c.routing.mode}/${c.routing.gated}`))].sort()).toEqual(['threshold/false', 'threshold/true', 'topk/true']);
    expect(surrogate.some((c) => c.calls[0]!.selected.length === 0)).toBe(true);
    // Key/value routing: entries leave the cache with the window inside the cases (a layer holds fewer entries than its row's tokens).
    const kv = cases.filter((c) => c.requires.includes('kv'));
    expect(new Set(kv.map((c) => c.pad))).toEqual(new Set(['left', 'right']));
    expect(kv.some((c) => c.routing.fromFile)).toBe(true);
    for (const c of kv) {
      const tokens = c.prompt.map((r) => r.length + c.steps.length);
      expect(
        c.calls.at(-1)!.cacheLengths.some((layer) => layer.some((n, row) => n < tokens[row]!)),
        `${c.name}: some layer's cache is shorter than its row`,
      ).toBe(true);
    }
    expect(cases.some((c) => c.routing.fromFile)).toBe(true);
    // Decisions exactly on the boundary: top-k ties, and r = p under threshold routing.
    expect(cases.some((c) => c.routing.mode === 'topk' && c.exactDecisions > 0)).toBe(true);
    expect(cases.some((c) => c.routing.mode === 'threshold' && c.exactDecisions > 0)).toBe(true);
    // On a rotary model, repeated ids tie at layer 0 with a random router.
    const repeated = cases.filter((c) => c.routers === 'layer0.safetensors');
    expect(repeated.length).toBeGreaterThan(0);
    const rotary = name !== 'gpt2-tiny';
    for (const c of repeated) expect(c.exactDecisions > 0, `${c.name}: ties`).toBe(rotary);
  });

  it.each(cases.map((c) => [c.name, c] as const))('%s: compiled logits and cache lengths match the oracle', async (_, c) => {
    const compileKey = JSON.stringify([c.routers, c.routing]);
    if (!compiledFor.has(compileKey)) compiledFor.set(compileKey, compile(source, join(ROOT, 'fixtures', 'oracle', name, c.routers), c));
    const compiled = compiledFor.get(compileKey)!;
    const got = await runCase(compiled.path, c, oracle.vocabSlice);
    expect(got).toHaveLength(c.calls.length);
    got.forEach((g, i) => {
      const call = i === 0 ? 'prefill' : `step ${i}`;
      expect(worst(g.logits, c.calls[i]!.logits), `${call}: max |compiled - oracle|`).toBeLessThan(TOLERANCE);
      expect(g.cacheLengths, `${call}: cache lengths [layer][row]`).toEqual(c.calls[i]!.cacheLengths);
    });
    // The prefill's selections, part by part, as the oracle chose them.
    const selected = await prefillSelections(compiled, c);
    expect([...selected.keys()].sort(), 'routed parts').toEqual(c.calls[0]!.selected.map((s) => `${s.layer}/${s.part}`).sort());
    for (const s of c.calls[0]!.selected) expect(selected.get(`${s.layer}/${s.part}`), `prefill selection of layer ${s.layer} ${s.part}`).toEqual(s.rows);
    // The routing matters: the original model is far from the oracle.
    const key = JSON.stringify([c.prompt, c.steps, c.pad]);
    if (!original.has(key)) original.set(key, await runCase(source, c, oracle.vocabSlice));
    const dense = original.get(key)!;
    // worst() turns NaN and shape mismatches into Infinity, which a "greater than" would accept.
    const effect = dense.map((d, i) => worst(d.logits, c.calls[i]!.logits));
    expect(effect.every(Number.isFinite), "original logits: finite, shaped like the oracle's").toBe(true);
    expect(Math.max(...effect), 'max |original - oracle|').toBeGreaterThan(MIN_EFFECT);
  });
});
