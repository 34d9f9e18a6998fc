/**
 * dense-past-length: a growing cache's shape read outside its own layer means "the past length",
 * so it is read off attention_mask instead of the cache:
 *
 *   Shape(past_key_values.l.key)  ->  Concat(Shape(past)[:seq], T - S, Shape(past)[seq+1:])   (then [start:end])
 *   T = attention_mask's width, S = input_ids' (or inputs_embeds') sequence length; without an
 *   attention_mask (a model that cannot pad), max(position_ids) + 1 - S.
 *
 * Exporters size a shared mask or positions by the shape of layer 0's past key (onnxruntime-genai's
 * builder among them). In the original model every growing cache holds T - S tokens, so the
 * rewrite computes the same values for every valid input. A routed layer's cache holds only the
 * tokens it selected, so its shape no longer says the past length: the dense layers reading the
 * shared mask would get one of the wrong width. A layer's reads of its own cache are left alone
 * (route-layers rewrites those of a routed layer in its own terms), and so are static caches,
 * whose shape is the buffer's.
 */
import type { DecoderStructure } from '../analysis/types.js';
import { isStaticLayout, kvSequenceAxis } from '../analysis/types.js';
import { DataType } from '../core/ir/dtype.js';
import type { Node, Value } from '../core/ir/graph.js';
import type { Model } from '../core/ir/model.js';
import { defaultOpset } from './modc-ops/index.js';
import { Emitter } from './modc-ops/emitter.js';
import type { Pass } from './pass-manager.js';

export interface DensePastLengthResult {
  changed: boolean;
  /** One line per rewritten node, or why reads were left alone. */
  notes: string[];
}

/** Rewrites every read of a growing cache's shape outside its layer. */
export function densePastLength(model: Model, structure: DecoderStructure): DensePastLengthResult {
  const g = model.graph;
  const caches = new Map<Value, { axis: number; rank: number; own: ReadonlySet<Node> }>();
  for (const l of structure.layers) {
    if (l.attention.form === 'recurrent' || isStaticLayout(l.kv.layout)) continue;
    const own = new Set(l.nodes);
    const rank = l.kv.layout === 'combined-2BHTD' ? 5 : 4;
    for (const t of [l.kv.key, l.kv.value]) caches.set(t.input, { axis: kvSequenceAxis(l.kv.layout), rank, own });
  }
  const reads = g.nodes.filter((n) => {
    const c = n.opType === 'Shape' && n.domain === '' ? caches.get(n.input(0)!) : undefined;
    return c && !c.own.has(n);
  });
  if (reads.length === 0) return { changed: false, notes: [] };
  const source = lengthSource(model);
  if (!source) {
    return {
      changed: false,
      notes: [
        `${reads[0]!.describe()} reads a cache's shape, but the model has no input_ids/inputs_embeds with attention_mask or position_ids to read the past length from`,
      ],
    };
  }
  const notes: string[] = [];
  for (const n of reads) {
    const past = n.input(0)!;
    const { axis, rank } = caches.get(past)!;
    const e = new Emitter(g, defaultOpset(model), 'modc/dense_past/', n);
    const full = e.op('Shape', [past]);
    const slice = (from: number, to: number) => e.op('Slice', [full, e.i64([from]), e.i64([to])]);
    const parts = [...(axis > 0 ? [slice(0, axis)] : []), e.op('Reshape', [source.length(e), e.i64([1])]), ...(axis + 1 < rank ? [slice(axis + 1, rank)] : [])];
    let dense = e.op('Concat', parts, { axis: 0 });
    const start = n.attrInt('start');
    const end = n.attrInt('end');
    if (start !== undefined || end !== undefined) dense = e.op('Slice', [dense, e.i64([start ?? 0]), e.i64([end ?? rank])]);
    n.output(0).replaceAllUsesWith(dense);
    g.removeNode(n, true);
    notes.push(`${n.describe()}: the past length of ${past} read off ${source.from}`);
  }
  return { changed: true, notes };
}

/** Where T - S (the past length of every growing cache in the original model) comes from, as an int64 scalar. */
function lengthSource(model: Model): { from: string; length: (e: Emitter) => Value } | null {
  const inputs = model.graph.inputs;
  const tokens = inputs.find((v) => v.name === 'input_ids') ?? inputs.find((v) => v.name === 'inputs_embeds');
  const mask = inputs.find((v) => v.name === 'attention_mask');
  const positions = inputs.find((v) => v.name === 'position_ids');
  if (!tokens) return null;
  if (mask) return { from: 'attention_mask', length: (e) => e.op('Sub', [e.dimScalar(mask, 1), e.dimScalar(tokens, 1)]) };
  if (!positions) return null;
  // No attention_mask: the model cannot pad, so every row's positions run past .. past + S - 1.
  return {
    from: 'position_ids',
    length: (e) => {
      const last = e.reduceMax(e.reduceMax(e.cast(positions, DataType.INT64), [1], false), [0], false);
      return e.op('Sub', [e.op('Add', [last, e.i64(1)]), e.dimScalar(tokens, 1)]);
    },
  };
}

export const densePastLengthPass: Pass = {
  name: 'dense-past-length',
  description: "read a growing cache's past length off attention_mask wherever a node outside its layer reads the cache's shape",
  run(model, _options, ctx) {
    return densePastLength(model, ctx.structure());
  },
};
