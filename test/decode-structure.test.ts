/**
 * The decode fast path of route-layers (docs/routing.md, "How a layer is routed"): for a
 * layer whose cache is appended by `Concat(past, new)`, no full cache goes through an If branch
 * or out of one as a copy. Checked on the compiled graph of every fixture:
 * - no Identity anywhere reads a converted layer's past or present cache (the old structure
 *   passed the past through the skip branch and the present through the keep branch);
 * - the present graph output is an If output whose branches compute it (a Concat of the past,
 *   or a GatherKv of one), never a value passed through from outside the branch;
 * - the layer's own If (`if_selected`) returns only the [B, S, H] stream (or update);
 * - the fast path is taken exactly where the analysis finds the unfused BHTD form.
 * Numerical equivalence and MoD semantics of the same compiles are test/mod.test.ts's.
 */
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { loadModel } from '../compiler/core/io/load.js';
import type { Graph, Node, Value } from '../compiler/core/ir/graph.js';
import { readRoutingMetadata } from '../compiler/metadata/routing-metadata.js';
import { allModels, tempDir } from './helpers.js';
import { compileWith } from './mod-helpers.js';

const tmp = tempDir('modc-decode-structure');

function* nodesOf(g: Graph): Iterable<Node> {
  yield* g.allNodes();
}

/** The node whose subgraph `g` is. */
function ownerOf(root: Graph, g: Graph): Node | undefined {
  for (const n of root.allNodes()) if (n.subgraphs().includes(g)) return n;
  return undefined;
}

describe.each(allModels())('$name', ({ path }) => {
  it('all-pass compile: converted layers with a Concat(past, new) cache append outside their If, with no full-cache copy through a branch', () => {
    const s = analyzeDecoder(loadModel(path));
    const fastForm = new Set(s.layers.filter((l) => l.attention.form === 'unfused' && l.kv.layout === 'BHTD').map((l) => l.index));
    const compiled = compileWith(tmp, path, 'all-pass', { gated: false });
    const model = loadModel(compiled.path);
    const g = model.graph;
    const meta = readRoutingMetadata(model)!;
    const compacted = meta.layers.filter((l) => l.part !== 'mlp').map((l) => l.layer);
    for (const l of compacted.filter((c) => fastForm.has(c))) {
      const layer = s.layers[l]!;
      const past = [layer.kv.key.input.name, layer.kv.value.input.name].map((n) => g.inputs.find((v) => v.name === n)!);
      const present = [layer.kv.key.output.name, layer.kv.value.output.name].map((n) => g.outputs.find((v) => v.name === n)!);
      const full = new Set<Value>([...past, ...present]);
      for (const n of nodesOf(g)) {
        if (n.opType === 'Identity')
          expect(
            n.inputs.some((v) => v && full.has(v)),
            `${n.describe()} copies a cache of layer ${l}`,
          ).toBe(false);
      }
      for (const p of present) {
        const producer = p.producer!;
        expect(producer.opType, `${p.name} is made by the pack If`).toBe('If');
        const slot = producer.outputs.indexOf(p);
        for (const branch of producer.subgraphs()) {
          const out = branch.outputs[slot]!;
          // Computed in the branch (allocated into the If's output), not passed through from outside.
          expect(out.producer?.graph, `${branch.name} passes ${p.name} through`).toBe(branch);
          expect(['Concat', 'GatherKv']).toContain(out.producer!.opType);
        }
      }
      const layerIf = g.nodes.find((n) => n.name === `modc/layer${l}/if_selected` || n.name === `modc/layer${l}/attention/if_selected`)!;
      expect(layerIf.outputs).toHaveLength(1);
      // No branch anywhere returns a cache of this layer.
      for (const n of nodesOf(g)) {
        for (const branch of n.subgraphs()) {
          for (const out of branch.outputs) {
            if (full.has(out)) throw new Error(`${branch.name} (of ${ownerOf(g, branch)?.describe()}) returns ${out.name} of layer ${l}`);
          }
        }
      }
    }
    // Layers of the other forms keep the general structure (no K/V If of their own).
    const fast = compacted.filter((l) => g.nodes.some((n) => n.name === `modc/layer${l}/kv_new` || n.name === `modc/layer${l}/attention/kv_new`));
    expect(fast).toEqual(compacted.filter((l) => fastForm.has(l)));
  });
});
