/**
 * The structure route-layers gives a converted part (docs/routing.md, "How a layer is routed"),
 * checked on the all-pass compile of every fixture at each granularity, on the graph alone:
 * - one If per converted part in the main graph (`if_selected`), so no weight is consumed two or
 *   more If levels below the graph that owns it (ONNX Runtime prepacks a MatMul weight only from
 *   its own graph or the one above); inside it, on a part that may skip compaction in a one-token
 *   call, the weight-free one-token Ifs (`one_token_in`, `one_token_out`) and
 *   no other, the exit's one-token branch of a block being its own residual add (no copy of it);
 * - the part's own nodes run in that If's then-branch in their original order, so a cache append
 *   (the unfused `Concat(past, new)`) stays where the original has it, between the nodes it
 *   stood between;
 * - each present cache of a compacted layer is made in the then-branch by the node that made it
 *   in the original (a Concat, or the fused attention op), straight into the If's output; the
 *   else-branch passes the past on with one Identity; no other node copies a cache;
 * - no gather of the token ids that only a Shape reads (the slots' validity has the same shape);
 * - the token grid (TokenGrid) in the main graph only when a compaction runs there, else in each
 *   branch that compacts;
 * - the cache interface: `past_valid.l` / `present_valid.l` for the Concat-semantics forms,
 *   `past_lengths.l` / `present_lengths.l` for GroupQueryAttention and static caches.
 * Numerical equivalence and MoD semantics of the same compiles are test/mod.test.ts's and
 * test/oracle.test.ts's.
 */
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { isStaticLayout } from '../compiler/analysis/types.js';
import { loadModel } from '../compiler/core/io/load.js';
import type { Graph, Node, Value } from '../compiler/core/ir/graph.js';
import type { Model } from '../compiler/core/ir/model.js';
import { inlineModcOps } from '../compiler/passes/inline-modc-ops.js';
import { readRoutingMetadata } from '../compiler/metadata/routing-metadata.js';
import type { RoutedPart } from '../compiler/routing/router-weights.js';
import { allModels, tempDir } from './helpers.js';
import { compileWith } from './mod-helpers.js';

const tmp = tempDir('modc-decode-structure');

function depthOf(g: Graph): number {
  let d = 0;
  for (let p = g.parent; p; p = p.parent) d++;
  return d;
}

/** Every use of an initializer two or more graph levels below the graph that owns it: `node <- initializer`. */
export function weightsBelowOneLevel(model: Model): string[] {
  const found: string[] = [];
  for (const n of model.graph.allNodes()) {
    for (const v of n.inputs) {
      if (!v) continue;
      let owner: Graph | null = n.graph!;
      while (owner && owner.initializers.get(v.name) !== v) owner = owner.parent;
      if (owner && depthOf(n.graph!) - depthOf(owner) >= 2) found.push(`${n.describe()} <- ${v.name}`);
    }
  }
  return found;
}

const tagOf = (layer: number, part: RoutedPart) => (part === 'block' ? `modc/layer${layer}` : `modc/layer${layer}/${part}`);

describe.each(allModels())('$name', ({ path }) => {
  const original = loadModel(path);
  const s = analyzeDecoder(original);
  // Node positions by name, for names the original gives one node only (third-party models repeat some).
  const named = new Map<string, number[]>();
  original.graph.nodes.forEach((n, i) => named.set(n.name, [...(named.get(n.name) ?? []), i]));
  const order = new Map([...named].filter(([name, at]) => name && at.length === 1).map(([name, at]) => [name, at[0]!]));
  it.each(['block', 'attention', 'mlp'] as const)(
    'all-pass %s compile: one If per converted part in the main graph, the part verbatim in it, presents made in place',
    (granularity) => {
      const model = loadModel(compileWith(tmp, path, 'all-pass', { gated: false, granularity }).path);
      const g = model.graph;
      const routed = readRoutingMetadata(model)!.layers;
      const ifs = [...g.allNodes()].filter((n) => n.opType === 'If' && n.name.startsWith('modc/'));
      expect(ifs.filter((n) => n.graph === g).map((n) => n.name)).toEqual(routed.map((r) => `${tagOf(r.layer, r.part)}/if_selected`));
      for (const n of ifs.filter((x) => x.graph !== g)) {
        expect(n.name, 'a nested modc If is a one-token If').toMatch(/\/one_token_(in|out)$/);
        expect(n.graph!.parent, `${n.name} sits in a branch of a main-graph If`).toBe(g);
        // The exit's one-token branch of a block runs the block's own residual add: its output, no
        // copy of it (a sub-layer part ends in its projection, whose weight stays a level up).
        if (n.name.endsWith('/one_token_out'))
          expect(
            n.subgraphs()[0]!.nodes.map((x) => x.opType),
            `${n.name}: then-branch`,
          ).toEqual([granularity === 'block' ? 'Add' : 'Identity']);
      }
      // The token grid is computed where the compactions read it: in the main graph only when a
      // compaction runs there, else in each branch that compacts (a one-token call computes none).
      const all = [...g.allNodes()];
      const grids = all.filter((n) => n.opType === 'TokenGrid');
      const compactions = all.filter((n) => n.opType === 'CompactTokens');
      for (const c of compactions) {
        const grid = c.input(1)?.producer;
        expect(grid?.opType, `${c.describe()} reads a TokenGrid`).toBe('TokenGrid');
        expect(grid!.graph === c.graph || grid!.graph === g, `${c.describe()}: its grid in its own graph or the main graph`).toBe(true);
      }
      expect(compactions.length, 'compactions (before inlining the modc ops)').toBeGreaterThan(0);
      expect(
        grids.some((n) => n.graph === g),
        'a TokenGrid in the main graph iff a compaction runs there',
      ).toBe(compactions.some((n) => n.graph === g));
      inlineModcOps(model);
      expect(weightsBelowOneLevel(model), 'weights consumed two or more If levels below their graph').toEqual([]);

      for (const r of routed) {
        const layerIf = g.nodes.find((n) => n.name === `${tagOf(r.layer, r.part)}/if_selected`)!;
        const [run, skip] = layerIf.subgraphs() as [Graph, Graph];
        // The part's own nodes, in their original order (the original's nodes keep their names).
        const own = run.nodes.filter((n) => order.has(n.name)).map((n) => order.get(n.name)!);
        expect(own, `layer ${r.layer} ${r.part}: original order kept`).toEqual([...own].sort((a, b) => a - b));
        // The one-token Ifs where the part may skip compaction: every MLP, and an attention with a
        // growing cache that reads no caller's 4-D mask (gathered at the indices).
        const layer = s.layers[r.layer]!;
        const packed = isStaticLayout(layer.kv.layout);
        const callerMask = layer.sideInputs.some((si) => si.kind === 'attention-mask' && si.form === 'caller-4d');
        expect(
          run.nodes.filter((n) => n.opType === 'If').map((n) => n.name.slice(tagOf(r.layer, r.part).length + 1)),
          `layer ${r.layer} ${r.part}: one-token Ifs`,
        ).toEqual(r.part !== 'mlp' && (packed || callerMask) ? [] : expect.arrayContaining(['one_token_in', 'one_token_out']));
        const under = [...run.allNodes()];
        // A rebuilt mask that reads the token ids only for their shape reads it off the slots' validity: no gather for it.
        const shapeOnly = under.filter(
          (n) => n.opType === 'GatherElements' && n.input(0)?.name === 'input_ids' && [...n.output(0).uses].every((u) => u.node.opType === 'Shape'),
        );
        expect(
          shapeOnly.map((n) => n.describe()),
          'token ids gathered only to be measured',
        ).toEqual([]);
        // A side input [B, 1, S, d] (rotary cos/sin) is gathered in place behind its unit axis
        // (GatherND, batch_dims), not gathered as [B, S, d] and unsqueezed again.
        const added = (n: Node | null) => !!n && !order.has(n.name);
        const regathered = under.filter(
          (n) => n.opType === 'Unsqueeze' && added(n) && n.input(0)?.producer?.opType === 'GatherND' && added(n.input(0)!.producer),
        );
        expect(
          regathered.map((n) => n.describe()),
          'gathered, then unsqueezed',
        ).toEqual([]);
        if (r.part === 'mlp') continue;
        const tensors = layer.kv.layout === 'combined-2BHTD' ? [layer.kv.key] : [layer.kv.key, layer.kv.value];
        for (const t of tensors) {
          const present = g.outputs.find((v) => v.name === t.output.name)!;
          expect(present.producer, `${present.name} comes out of the layer's If`).toBe(layerIf);
          const slot = layerIf.outputs.indexOf(present);
          const made = run.outputs[slot]!.producer!;
          expect(made.graph, `${present.name} is made in the then-branch`).toBe(run);
          expect(made.name, `${present.name} is made by the original's own node`).toBe(t.output.producer!.name);
          const passed = skip.outputs[slot]!.producer!;
          expect([passed.opType, passed.input(0)?.name]).toEqual(['Identity', t.input.name]);
        }
        // No other node copies a cache of this layer.
        const caches = new Set(tensors.flatMap((t) => [t.input.name, t.output.name]));
        const copies = [...g.allNodes()].filter(
          (n) => n.opType === 'Identity' && n.graph !== skip && n.inputs.some((v: Value | null) => v && caches.has(v.name)),
        );
        expect(copies.map((n: Node) => n.describe())).toEqual([]);
        const inputs = new Set(g.inputs.map((v) => v.name));
        const lengths = layer.attention.form === 'GroupQueryAttention' || isStaticLayout(layer.kv.layout);
        expect([inputs.has(`past_valid.${r.layer}`), inputs.has(`past_lengths.${r.layer}`)]).toEqual([!lengths, lengths]);
      }
    },
  );
});
