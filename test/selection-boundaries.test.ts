/**
 * SPEC.md's selection rules where they alone decide, on fixtures/llama-tiny (a rotary model):
 * - threshold-p selects r_t >= p, so r = p is selected: all-pass routers (w = 0, b = 20) give
 *   r = 1 exactly in float32, so --threshold 1 selects every token; w = 0, b = 0 gives r = 0.5
 *   exactly, selected at p = 0.5, while b = -1e-3 (r = 0.49975) selects nothing;
 * - top-k keeps ceil(c * n) tokens per row and breaks equal scores in favour of the earlier
 *   token: w = 0 scores every token 0 (all tie), and repeated ids tie at layer 0 of a rotary
 *   model (equal embeddings, no position in the stream);
 * - a one-token decode step under top-k selects its token iff r >= 0.5 (top-k would always keep
 *   it), and a one-token prompt uses top-k, which keeps it (README, "Semantics where SPEC.md is
 *   silent").
 * Every expected selection and cache length is written here by hand from those rules, never
 * computed by the code under test. Each case checks the compiled model's own selection values
 * (made graph outputs), its per-layer cache lengths, and the MoD reference executor's
 * selections (compiler/apps/reference, which selects with the TypeScript kernels), in the prefill
 * and in decode steps.
 */
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { exposeSelections, type Selection } from '../compiler/apps/eval/selection.js';
import { ModReference } from '../compiler/apps/reference/mod-reference.js';
import { routingPlanOf } from '../compiler/apps/verify/verify.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { readRoutingMetadata } from '../compiler/metadata/routing-metadata.js';
import { writeRouterFile } from '../compiler/routing/router-weights.js';
import { type ort } from '../compiler/runtime/ort.js';
import { type Logits, ModSession } from '../compiler/runtime/session.js';
import { fixture, runCli, tempDir } from './helpers.js';
import { padSides, worstReal } from './mod-helpers.js';

const LLAMA = fixture('llama-tiny');
const LAYERS = 3;
const HIDDEN = 64;
const tmp = tempDir('modc-boundaries');
let counter = 0;

/** PROMPTS.b3's shape: rows of 7, 3 and 5 tokens. */
const ROWS = [
  [5, 6, 7, 8, 9, 10, 11],
  [12, 13, 14],
  [15, 16, 17, 18, 19],
];

/** `n` trues then `len - n` falses: a row whose first n tokens are selected. */
const first = (n: number, len: number) => Array.from({ length: len }, (_, i) => i < n);
const none = (len: number) => first(0, len);
const all = (len: number) => first(len, len);
const repeat = <T>(v: T, times: number) => Array.from({ length: times }, () => v);

/** A router file: w = 0 and bias b on the given layers (every score is exactly b). */
function constantRouters(bias: number, layers = [0, 1, 2]): string {
  const path = join(tmp, `const-${counter++}.safetensors`);
  writeRouterFile(
    path,
    layers.map((layer) => ({ layer, weight: new Float32Array(HIDDEN), bias })),
  );
  return path;
}

async function compileCli(...flags: string[]): Promise<string> {
  const out = join(tmp, `m${counter++}`, 'model.onnx');
  const res = await runCli('compile', LLAMA, '-o', out, '-q', ...flags);
  expect(res.code, res.stderr).toBe(0);
  return out;
}

/** What one call selected: per routed layer, per row, its real tokens. */
type Chosen = Map<number, boolean[][]>;

/** The compiled model with its selection values as outputs, and the reference executor with the same routing. */
class Probe {
  private readonly releases: (() => Promise<void>)[] = [];
  private constructor(
    readonly session: ModSession,
    readonly ref: ModReference,
    private readonly selections: Selection[],
  ) {}

  static async create(compiled: string): Promise<Probe> {
    const model = loadModel(compiled);
    const selections = exposeSelections(model, readRoutingMetadata(model)!);
    const instrumented = join(tmp, `probe${counter++}`, 'model.onnx');
    saveModel(model, instrumented);
    const ref = await ModReference.create(LLAMA, routingPlanOf(loadModel(compiled)), join(tmp, `ref${counter++}`));
    const probe = new Probe(await ModSession.create(instrumented), ref, selections);
    probe.releases.push(() => ref.release());
    return probe;
  }

  /** The compiled model's logits of the last prefill. */
  logits: Logits | null = null;

  /** Prefill both; returns [compiled, reference] selections at real tokens. */
  async forward(rows: number[][], pad: 'left' | 'right'): Promise<[Chosen, Chosen]> {
    this.logits = await this.session.forward(rows, { pad });
    await this.ref.forward(rows, { pad });
    return [
      this.compiledChosen(
        rows.map((r) => r.length),
        pad,
      ),
      this.refChosen(
        rows.map((r) => r.length),
        pad,
      ),
    ];
  }

  /** One decode step (one token per row) for both. */
  async step(next: number[]): Promise<[Chosen, Chosen]> {
    await this.session.step(next);
    await this.ref.step(next);
    return [
      this.compiledChosen(
        next.map(() => 1),
        'left',
      ),
      this.refChosen(
        next.map(() => 1),
        'left',
      ),
    ];
  }

  private compiledChosen(lengths: number[], pad: 'left' | 'right'): Chosen {
    const out: Chosen = new Map();
    for (const s of this.selections) {
      const t = this.session.lastOutputs[s.output] as ort.Tensor;
      const [B, S] = t.dims as number[];
      const data = t.data as Uint8Array;
      expect(B).toBe(lengths.length);
      out.set(
        s.layer,
        lengths.map((n, b) => {
          const offset = pad === 'left' ? S! - n : 0;
          return Array.from({ length: n }, (_, i) => data[b * S! + offset + i] !== 0);
        }),
      );
    }
    return out;
  }

  private refChosen(lengths: number[], pad: 'left' | 'right'): Chosen {
    const width = Math.max(...lengths);
    const out: Chosen = new Map();
    for (const [part, picks] of this.ref.selections.at(-1)!) {
      out.set(
        Number(part),
        picks.map((p, b) => {
          const offset = pad === 'left' ? width - lengths[b]! : 0;
          const row = none(lengths[b]!);
          for (const s of p) row[s - offset] = true;
          return row;
        }),
      );
    }
    return out;
  }

  async release(): Promise<void> {
    for (const r of this.releases) await r();
  }
}

const probes: Probe[] = [];
afterAll(async () => {
  for (const p of probes) await p.release();
});
async function probe(compiled: string): Promise<Probe> {
  const p = await Probe.create(compiled);
  probes.push(p);
  return p;
}

/** Both the compiled model and the reference selected exactly `want` (per layer, per row) in this call. */
function expectChosen([compiled, reference]: [Chosen, Chosen], want: Record<number, boolean[][]>, what: string): void {
  const expected = new Map(Object.entries(want).map(([l, rows]) => [Number(l), rows]));
  expect(compiled, `${what}: the compiled model's selections`).toEqual(expected);
  expect(reference, `${what}: the reference executor's selections`).toEqual(expected);
}

function expectCaches(p: Probe, want: number[][], what: string): void {
  expect(p.session.layerCacheLengths(), `${what}: the compiled model's cache lengths [layer][row]`).toEqual(want);
  expect(p.ref.layerCacheLengths(), `${what}: the reference's cache lengths [layer][row]`).toEqual(want);
}

const sides = padSides(LLAMA);

describe('threshold-p: r = p is selected', () => {
  it('all-pass routers (r = sigmoid(20) = 1 in float32) with --threshold 1 select every token, prefill and decode', async () => {
    const compiled = await compileCli('--router-init', 'all-pass', '--threshold', '1');
    const original = await ModSession.create(LLAMA);
    for (const pad of sides) {
      const p = await probe(compiled);
      const everything = { 0: ROWS.map((r) => all(r.length)), 1: ROWS.map((r) => all(r.length)), 2: ROWS.map((r) => all(r.length)) };
      expectChosen(await p.forward(ROWS, pad), everything, `prefill, ${pad} padding`);
      expectCaches(p, repeat([7, 3, 5], LAYERS), `prefill, ${pad} padding`);
      // Gated with g = 1: the original model's logits.
      expect(worstReal(await original.forward(ROWS, { pad }), p.logits!, ROWS, pad)).toBeLessThan(1e-4);
      const step = { 0: [[true], [true], [true]], 1: [[true], [true], [true]], 2: [[true], [true], [true]] };
      expectChosen(await p.step([1, 2, 3]), step, `step 1, ${pad} padding`);
      expectChosen(await p.step([4, 5, 6]), step, `step 2, ${pad} padding`);
      expectCaches(p, repeat([9, 5, 7], LAYERS), `after 2 steps, ${pad} padding`);
    }
  });

  it('w = 0, b = 0 (r = 0.5 exactly) at p = 0.5 selects every token; b = -1e-3 (r = 0.49975) selects none', async () => {
    const at = await probe(await compileCli('--routers', constantRouters(0), '--threshold', '0.5', '--ungated'));
    const below = await probe(await compileCli('--routers', constantRouters(-1e-3), '--threshold', '0.5', '--ungated'));
    const original = await ModSession.create(LLAMA);
    for (const pad of sides) {
      expectChosen(
        await at.forward(ROWS, pad),
        { 0: ROWS.map((r) => all(r.length)), 1: ROWS.map((r) => all(r.length)), 2: ROWS.map((r) => all(r.length)) },
        `r = p, ${pad}`,
      );
      expectCaches(at, repeat([7, 3, 5], LAYERS), `r = p, ${pad}`);
      // Ungated, every token selected: the original model's logits.
      expect(worstReal(await original.forward(ROWS, { pad }), at.logits!, ROWS, pad)).toBeLessThan(1e-4);
      expectChosen(await at.step([1, 2, 3]), { 0: [[true], [true], [true]], 1: [[true], [true], [true]], 2: [[true], [true], [true]] }, `r = p, step, ${pad}`);
      expectChosen(
        await below.forward(ROWS, pad),
        { 0: ROWS.map((r) => none(r.length)), 1: ROWS.map((r) => none(r.length)), 2: ROWS.map((r) => none(r.length)) },
        `r < p, ${pad}`,
      );
      expectCaches(below, repeat([0, 0, 0], LAYERS), `r < p, ${pad}`);
      expectChosen(
        await below.step([1, 2, 3]),
        { 0: [[false], [false], [false]], 1: [[false], [false], [false]], 2: [[false], [false], [false]] },
        `r < p, step, ${pad}`,
      );
      expectCaches(below, repeat([0, 0, 0], LAYERS), `r < p, after a step, ${pad}`);
    }
  });
});

describe('top-k: equal scores go to the earlier token', () => {
  it('w = 0 (every score 0) keeps the first ceil(c * n) real tokens of each row, at every layer', async () => {
    const p = await probe(await compileCli('--routers', constantRouters(0), '--routing', 'topk', '--capacity', '0.5', '--ungated'));
    // n = 7, 3, 5: ceil(3.5) = 4, ceil(1.5) = 2, ceil(2.5) = 3.
    const want = [first(4, 7), first(2, 3), first(3, 5)];
    for (const pad of sides) {
      expectChosen(await p.forward(ROWS, pad), { 0: want, 1: want, 2: want }, `prefill, ${pad} padding`);
      expectCaches(p, repeat([4, 2, 3], LAYERS), `prefill, ${pad} padding`);
    }
  });

  it('repeated ids tie at layer 0 of a rotary model: a random router keeps the first of them', async () => {
    const p = await probe(await compileCli('--router-init', 'random', '--seed', '5', '--layers', '0', '--routing', 'topk', '--capacity', '0.3'));
    const rows = [
      [7, 7, 7, 7, 7],
      [9, 9, 9],
    ];
    for (const pad of sides) {
      // n = 5, 3: ceil(1.5) = 2, ceil(0.9) = 1.
      expectChosen(await p.forward(rows, pad), { 0: [first(2, 5), first(1, 3)] }, `${pad} padding`);
      expect(p.session.layerCacheLengths()[0], `${pad} padding: layer 0 cache lengths`).toEqual([2, 1]);
      // The case is a tie: within each row, every token has the same score.
      for (const row of p.ref.scores.at(-1)!.get('0')!) expect(new Set(row).size, `scores ${row.join(', ')} tie`).toBe(1);
    }
  });
});

describe('top-k in a one-token step: r >= 0.5', () => {
  it.each([
    [-1, false],
    [0, true],
    [1, true],
  ])('w = 0, b = %f: the prefill keeps ceil(c * n) tokens; a decode step selects its token iff r >= 0.5 (%s)', async (bias, selected) => {
    const p = await probe(await compileCli('--routers', constantRouters(bias), '--routing', 'topk', '--capacity', '0.5', '--ungated'));
    const pad = sides[0]!;
    const want = [first(4, 7), first(2, 3), first(3, 5)];
    expectChosen(await p.forward(ROWS, pad), { 0: want, 1: want, 2: want }, 'prefill');
    expectCaches(p, repeat([4, 2, 3], LAYERS), 'prefill');
    const step = repeat([selected], 3);
    expectChosen(await p.step([1, 2, 3]), { 0: step, 1: step, 2: step }, 'step 1');
    expectChosen(await p.step([4, 5, 6]), { 0: step, 1: step, 2: step }, 'step 2');
    expectCaches(p, repeat(selected ? [6, 4, 5] : [4, 2, 3], LAYERS), 'after 2 steps');
  });

  it('a one-token prompt is top-k (its token kept, r = 0.27); the step after it uses r >= 0.5 (skipped)', async () => {
    const p = await probe(await compileCli('--routers', constantRouters(-1), '--routing', 'topk', '--capacity', '0.5', '--ungated'));
    expectChosen(await p.forward([[42]], sides[0]!), { 0: [[true]], 1: [[true]], 2: [[true]] }, 'one-token prompt');
    expectCaches(p, repeat([1], LAYERS), 'one-token prompt');
    expectChosen(await p.step([43]), { 0: [[false]], 1: [[false]], 2: [[false]] }, 'the step after it');
    expectCaches(p, repeat([1], LAYERS), 'after the step');
  });
});
