/**
 * The fuzzer's short run: a fixed seed, 500 mutated fixtures (those under 2 MB) through load -> inspect -> analyse ->
 * compile -> save -> reload, a sample loaded in ONNX Runtime, and a few of those whose input
 * loads checked by running them (all-pass compile against the original, random routers against
 * the reference executor). Any crash (an error that is not a ModcError), hang, multi-line
 * message, output ONNX Runtime rejects while it loads the input, or mismatch fails the suite,
 * with the reproducing case in the message. The long run is `npm run fuzz`.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { fuzz } from './fuzz/pool.js';
import { FIXTURES, seedModels } from './fuzz/seeds.js';
import { differential } from './fuzz/differential.js';
import type { Outcome } from './fuzz/run-case.js';
import { Rng } from './fuzz/mutate.js';
import type { Model } from '../compiler/core/ir/model.js';
import { Tensor } from '../compiler/core/ir/tensor.js';
import { DataType, floatToHalf } from '../compiler/core/ir/dtype.js';
import { compileWith } from './mod-helpers.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { ModSession } from '../compiler/runtime/session.js';

const scratch = mkdtempSync(join(tmpdir(), 'modc-fuzz-test-'));
afterAll(() => rmSync(scratch, { recursive: true, force: true }));

describe('mutation fuzzing (short run)', () => {
  it('500 cases, seed 12: no crash, hang, multi-line error or output ONNX Runtime rejects', async () => {
    const stats = await fuzz({
      fixtures: seedModels(scratch, [], 2 ** 21),
      seed: 12,
      cases: 500,
      workers: 2,
      ortSample: 0.2,
      diffSample: 0.5,
      timeoutMs: 60_000,
    });
    const report = stats.failures.map(
      (f) => `${f.kind} x${f.count} at ${f.stage} (seed ${f.seed}, case ${f.index}, ${f.fixture}): ${f.message.split('\n')[0]} [${f.log.join('; ')}]`,
    );
    expect(report).toEqual([]);
    expect(stats.cases).toBe(500);
    // The run exercised both sides: inputs refused, and outputs compiled, saved and loaded back.
    expect(stats.outcomes.refused).toBeGreaterThan(100);
    expect(stats.outcomes.accepted).toBeGreaterThan(25);
    expect(stats.ortInputLoaded).toBeGreaterThan(0);
    expect(stats.diffPassed).toBeGreaterThan(2);
  }, 600_000);
});

describe('the differential check', () => {
  const fixture = (dir: string) => join(FIXTURES, dir, 'model.onnx');

  it('passes on models modc compiles correctly (a sliding-window static cache, an MoE MLP, a layer with no norm, a model that cannot pad)', async () => {
    const paths = [
      ...['forms-static-window-tiny', 'forms-moe-tiny', 'forms-nonorm-tiny'].map(fixture),
      join(FIXTURES, 'forms-static-causal-tiny', 'causal.onnx'),
    ];
    for (const [i, path] of paths.entries()) {
      const d = await differential(path, join(scratch, `diff-ok${i}`), new Rng(i + 1));
      expect(d.kind, `${path}: ${JSON.stringify(d)}`).toBe('passed');
    }
  });

  it('reports a compiled model that does not keep the meaning as a mismatch, naming the failed check', async () => {
    // A weight of the compiled model changed after the compile: it no longer agrees with the reference.
    const breakLmHead = (m: Model) => {
      const w = m.graph.initializers.get('lm_head.weight')!;
      const t = w.initializer!;
      const data = Float32Array.from(t.toArray() as Float32Array, (v) => v * 1.5);
      m.graph.removeInitializer(w);
      m.graph.addInitializer(w, Tensor.fromArray('', t.dims, data));
    };
    const d = await differential(join(FIXTURES, 'forms-unsorted-tiny', 'unsorted.onnx'), join(scratch, 'diff-broken'), new Rng(3), {
      afterCompile: breakLmHead,
    });
    expect(d.kind).toBe('mismatch');
    expect((d as { message: string }).message).toMatch(
      /^random routers seed \d+, (threshold|topk), (gated|ungated), (block|attention|mlp): semantics: max \|logit diff\| /,
    );
  });

  it('reads a difference against the size of the logits: a model whose logits are near 1e17 passes (fuzz seed 42, cases 59, 2905 and 2931: flipped weight bytes)', async () => {
    // Float32 keeps about 7 digits: two correct compiles of this model round differently by far more than 1e-4.
    const model = loadModel(join(FIXTURES, 'forms-unsorted-tiny', 'unsorted.onnx'));
    const w = model.graph.initializers.get('lm_head.weight')!;
    const t = w.initializer!;
    model.graph.removeInitializer(w);
    model.graph.addInitializer(
      w,
      Tensor.fromArray(
        '',
        t.dims,
        Float32Array.from(t.toArray() as Float32Array, (v) => v * 1e16),
      ),
    );
    const path = join(scratch, 'huge', 'model.onnx');
    saveModel(model, path);
    const logits = await (await ModSession.create(path)).forward([[5, 6, 7, 8, 9, 10, 11]]);
    expect(Math.max(...Array.from(logits.data, Math.abs))).toBeGreaterThan(1e16);
    for (let i = 0; i < 3; i++) {
      const d = await differential(path, join(scratch, `diff-huge${i}`), new Rng(20 + i));
      expect(d.kind, JSON.stringify(d)).toBe('passed');
    }
  });

  it('a first routing difference at a near tie is not a mismatch (fuzz seed 44, case 1920: genai-tiny, float16, top-k on the attention parts)', async () => {
    // The compiled model runs the selected tokens batched, the reference row by row: their float16
    // streams differ by rounding, and layer 2 row 0 scores two tokens 4e-4 apart at the top-k boundary.
    const routing = { seed: 9, mode: 'topk', gated: false, granularity: 'attention' } as const;
    const d = await differential(join(FIXTURES, 'genai-tiny', 'model.onnx'), join(scratch, 'diff-tie'), new Rng(7), { routing });
    expect(d).toEqual({
      kind: 'skipped',
      note: expect.stringMatching(
        /^a routing near tie \(random routers seed 9, topk, ungated, attention\): layer 2 \(attention\), call 0, row 0: .* against a boundary of /,
      ),
    });
  });

  /** One fuzz case, regenerated from its fixture, seed and index, through a worker as it ran. */
  async function replay(fixture: string, seed: number, index: number): Promise<Outcome> {
    const outcomes: Outcome[] = [];
    const stats = await fuzz({
      fixtures: [join(FIXTURES, fixture)],
      seed,
      start: index,
      cases: 1,
      workers: 1,
      ortSample: 1,
      diffSample: 1,
      timeoutMs: 60_000,
      onOutcome: (_spec, o) => outcomes.push(o),
    });
    expect(stats.failures).toEqual([]);
    expect(outcomes).toHaveLength(1);
    return outcomes[0]!;
  }

  it("a worker that dies while ONNX Runtime runs the original is the input's doing: accepted, with a note (fuzz seed 44, case 828)", async () => {
    const o = await replay('genai-tiny', 44, 828);
    expect([o.kind, o.differential]).toEqual([
      'accepted',
      expect.stringMatching(/^skipped: ONNX Runtime did not run the original \(worker process died \(SIGSEGV\)/),
    ]);
  });

  it("a model whose rows depend on the rest of the batch is not checked (fuzz seed 45, case 1307: llama-tiny's rotate-half sliced by the batch size)", async () => {
    const o = await replay('llama-tiny', 45, 1307);
    expect(o.log).toContain('int64 constant "" changed');
    expect([o.kind, o.differential]).toEqual([
      'accepted',
      expect.stringMatching(/^skipped: the original's rows depend on the batch \(row 0 alone differs by /),
    ]);
  });

  it('float16 logits near 1000 are read against float16 rounding, one unit of which is 0.5 to 1 there (fuzz seed 45, case 2402: flipped bytes in an fp16 GroupQueryAttention model)', async () => {
    // forms-gqa-fp16-tiny with lm_head scaled by 300: logits near 1200, where two correct compiles round apart by a unit.
    const model = loadModel(join(FIXTURES, 'forms-gqa-fp16-tiny', 'model.onnx'));
    const w = model.graph.initializers.get('lm_head.w')!;
    const t = w.initializer!;
    model.graph.removeInitializer(w);
    model.graph.addInitializer(
      w,
      Tensor.fromArray(
        '',
        t.dims,
        Uint16Array.from(t.toArray() as Float32Array, (v) => floatToHalf(v * 300)),
        DataType.FLOAT16,
      ),
    );
    const path = join(scratch, 'f16-large', 'model.onnx');
    saveModel(model, path);
    const logits = await (await ModSession.create(path)).forward([[5, 6, 7, 8, 9, 10, 11]]);
    expect(Math.max(...Array.from(logits.data, Math.abs))).toBeGreaterThan(1024);
    for (let i = 0; i < 2; i++) {
      const d = await differential(path, join(scratch, `diff-f16-${i}`), new Rng(30 + i));
      expect(d.kind, JSON.stringify(d)).toBe('passed');
    }
  });

  it('is not run, saying why, on a model it has no original to compare with (a file that does not load, a compiled model)', async () => {
    const missing = await differential(join(scratch, 'nothing', 'model.onnx'), join(scratch, 'diff-missing'), new Rng(5));
    expect(missing).toEqual({ kind: 'skipped', note: expect.stringMatching(/^refused: cannot read .*nothing.model\.onnx: no such file/) });
    const compiled = compileWith(scratch, fixture('llama-tiny'), 'random', {}).path;
    expect(await differential(compiled, join(scratch, 'diff-compiled'), new Rng(6))).toEqual({ kind: 'skipped', note: 'the input is a compiled model' });
  });
});
