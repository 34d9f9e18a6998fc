/**
 * The MoD contract of SPEC.md, on every model in fixtures/ (ours and the vendored third-party ones):
 * - equivalence anchor: all tokens selected, ungated, reproduces the original (prefill and
 *   every step of a greedy run, batch 1 and batch 3 with padding on each supported side);
 * - MoD semantics: with random routers selecting about half the tokens, the compiled model
 *   agrees with the reference executor (threshold-p and top-k, gated and ungated), prefill and
 *   decode, with the same per-layer cache lengths and KV bytes.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ModReference } from '../compiler/apps/reference/mod-reference.js';
import { lastPosition, ModSession } from '../compiler/runtime/session.js';
import { contractModels, tempDir } from './helpers.js';
import { compileWith, expectSameRun, padSides, prefillSelection, PROMPTS, splittingThreshold, tolerance, worstReal, worstRows } from './mod-helpers.js';

const tmp = tempDir('modc-mod');
let counter = 0;
const compile = (source: string, routers: 'all-pass' | 'random', opts: Parameters<typeof compileWith>[3]) => compileWith(tmp, source, routers, opts);

describe.each(contractModels())('$name', ({ path }) => {
  it('all tokens selected and ungated reproduces the original: prefill and a 32-token greedy run', async () => {
    const tol = await tolerance(path, 1e-4);
    const compiled = compile(path, 'all-pass', { gated: false });
    for (const pad of padSides(path)) {
      for (const rows of [PROMPTS.b1, PROMPTS.b3]) {
        const [orig, mod] = await Promise.all([ModSession.create(path), ModSession.create(compiled.path)]);
        await expectSameRun(orig, mod, rows, pad, 32, tol, `pad ${pad}, batch ${rows.length}`);
      }
    }
  });

  // All-pass routers give r = sigmoid(20) = 1 in float32 and select every token under either mode:
  // top-k at capacity 1 keeps every real token, and gating multiplies by exactly 1.
  it.each([
    ['threshold', true],
    ['topk', false],
    ['topk', true],
  ] as const)(
    'all tokens selected, %s routing (gated %s, capacity 1), reproduces the original: prefill and 4 greedy steps, batch 3 with padding',
    async (mode, gated) => {
      const compiled = compile(path, 'all-pass', { mode, gated, capacity: 1 });
      expect(compiled.plan.mode).toBe(mode);
      expect(compiled.plan.gated).toBe(gated);
      const pad = padSides(path).at(-1)!;
      const [orig, mod] = await Promise.all([ModSession.create(path), ModSession.create(compiled.path)]);
      await expectSameRun(orig, mod, PROMPTS.b3, pad, 4, await tolerance(path, 1e-4), `${mode}, gated ${gated}, pad ${pad}`);
    },
  );

  // A batch-1 step of one token runs a routed part without compaction when the part selects it
  // (compiler/passes/one-token-path.ts) and skips it otherwise: both must agree with the reference.
  it.each(['threshold', 'topk'] as const)(
    'random routers at batch 1, %s routing (ungated): one-token steps that run and that skip a layer agree with the reference executor',
    async (mode) => {
      const tol = await tolerance(path, 1e-4);
      const rows = PROMPTS.b1;
      const pad = padSides(path)[0]!;
      const threshold = mode === 'threshold' ? await splittingThreshold(tmp, path, rows, pad, { gated: false }) : 0.5;
      const compiled = compile(path, 'random', { mode, gated: false, threshold, capacity: 0.5 });
      const mod = await ModSession.create(compiled.path);
      const ref = await ModReference.create(path, compiled.plan, join(tmp, `ref${counter++}`));
      try {
        expect(worstReal(await mod.forward(rows, { pad }), await ref.forward(rows, { pad }), rows, pad), 'prefill').toBeLessThan(tol);
        for (let t = 0; t < 12; t++) {
          const next = [(t * 7 + 3) % 50];
          expect(worstRows(lastPosition(await mod.step(next)), lastPosition(await ref.step(next))), `step ${t}`).toBeLessThan(tol);
        }
        expect(mod.layerCacheLengths()).toEqual(ref.layerCacheLengths());
        expect(mod.kvBytes()).toBe(ref.kvBytes());
        // Over the steps, routed parts both ran their one token and skipped it.
        const counts = ref.selections.slice(1).flatMap((call) => [...call.values()].map((perRow) => perRow[0]!.length));
        expect(counts).toContain(1);
        expect(counts).toContain(0);
      } finally {
        await ref.release();
      }
    },
  );

  it.each([
    ['threshold', true],
    ['threshold', false],
    ['topk', true],
    ['topk', false],
  ] as const)('random routers, %s routing (gated %s), agree with the reference executor', async (mode, gated) => {
    const tol = await tolerance(path, 1e-4);
    const pad = padSides(path).at(-1)!;
    const rows = PROMPTS.b3;
    const threshold = mode === 'threshold' ? await splittingThreshold(tmp, path, rows, pad, { gated }) : 0.5;
    const compiled = compile(path, 'random', { mode, gated, threshold, capacity: 0.5 });
    const mod = await ModSession.create(compiled.path);
    const ref = await ModReference.create(path, compiled.plan, join(tmp, `ref${counter++}`));
    try {
      expect(worstReal(await mod.forward(rows, { pad }), await ref.forward(rows, { pad }), rows, pad), 'prefill').toBeLessThan(tol);
      const steps = mode === 'threshold' && gated ? 32 : 4;
      for (let t = 0; t < steps; t++) {
        const next = [t + 1, t + 2, t + 3];
        expect(worstRows(lastPosition(await mod.step(next)), lastPosition(await ref.step(next))), `step ${t}`).toBeLessThan(tol);
      }
      expect(mod.layerCacheLengths()).toEqual(ref.layerCacheLengths());
      // Rows that selected different counts leave empty slots in a routed layer's cache until the
      // session compacts it: never fewer bytes than the reference's packed caches, then exactly those.
      expect(mod.kvBytes()).toBeGreaterThanOrEqual(ref.kvBytes());
      mod.compact();
      expect(mod.layerCacheLengths()).toEqual(ref.layerCacheLengths());
      expect(mod.kvBytes()).toBe(ref.kvBytes());
      // Partial routing: in the prefill some real tokens of some layer are selected and some are
      // not (counted over all layers and rows, so all-selected and none-selected both fail), and
      // some layer's cache is shorter than its row's context.
      const { selected, real } = prefillSelection(ref, rows);
      expect(selected).toBeGreaterThan(0);
      expect(selected).toBeLessThan(real);
      const context = rows.map((r) => r.length + steps);
      expect(mod.layerCacheLengths().some((layer) => layer.some((n, r) => n < context[r]!))).toBe(true);
    } finally {
      await ref.release();
    }
  });
});
