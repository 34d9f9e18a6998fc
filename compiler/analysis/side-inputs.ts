/**
 * Classifying what a layer reads besides its residual input. In order: constants (weights), the
 * layer's own past KV, the slot a fused op reads the value at (its schema says what it is),
 * then dataflow: rotary tables (Cos/Sin of positions), masks (computed from attention_mask),
 * positions, and lengths computed only from tensor shapes.
 */
import type { Graph, Node, Value } from '../core/ir/graph.js';
import type { GraphFacts } from './graph-facts.js';
import { fusedAttentionSchema, isRotaryOp, ROTARY_SLOTS, standardSlot, type AttentionSlot } from './ops.js';
import { trackAxes, type AxisFact } from './token-axes.js';
import type { KvCacheSpec, SideInput } from './types.js';

/** Graph inputs a value is computed from: through data, or only through Shape. */
interface Origins {
  data: Set<Value>;
  shape: Set<Value>;
  /** Op types on the data paths (to spot Cos/Sin of positions). */
  ops: Set<string>;
}

export class SideInputClassifier {
  private readonly origins = new Map<Value, Origins>();
  private readonly axes = new Map<Value, Map<Value, AxisFact>>();
  private readonly graphInputs: Set<Value>;

  constructor(
    private readonly graph: Graph,
    private readonly facts: GraphFacts,
    private readonly isPrefix: (n: Node) => boolean,
  ) {
    this.graphInputs = new Set(graph.inputs);
  }

  classify(v: Value, readers: ReadonlySet<Node>, kv: KvCacheSpec, state: ReadonlySet<Value> = new Set()): SideInput {
    if (this.facts.isConstant(v)) return { kind: 'weight', value: v };
    // Checked before the KV cache: a recurrent layer's `kv` names its state.
    if (state.has(v))
      return {
        kind: 'other',
        value: v,
        reason: 'state besides the KV cache (conv/recurrent state of a hybrid model): a layer with state stays dense and its state passes through untouched',
      };
    const past = pastRole(v, kv);
    if (past) return { kind: 'past-kv', value: v, role: past };
    const slot = slotOf(v, readers);
    if (slot) return this.bySlot(v, slot);
    return this.byDataflow(v);
  }

  private bySlot(v: Value, slot: AttentionSlot): SideInput {
    switch (slot.role) {
      case 'mask':
        return this.mask(v, slot.form);
      case 'sequence-length':
        return { kind: 'sequence-length', value: v, role: slot.length };
      case 'positions':
        return this.perToken(v, 'positions');
      case 'rotary-cache':
        return { kind: 'other', value: v, reason: `a computed rotary ${slot.which} cache` };
      default:
        return { kind: 'other', value: v, reason: `read as ${slot.role} but not this layer's cache` };
    }
  }

  private byDataflow(v: Value): SideInput {
    const o = this.originsOf(v);
    const names = [...o.data].map((x) => x.name);
    if (o.ops.has('Cos') || o.ops.has('Sin')) return this.perToken(v, o.ops.has('Cos') ? 'rotary-cos' : 'rotary-sin');
    if (names.includes('attention_mask')) return this.mask(v, (this.facts.rank(v) ?? 4) >= 3 ? 'additive-bias' : 'raw-2d');
    if (names.includes('position_ids')) return this.perToken(v, v.name === 'position_ids' ? 'positions' : 'rotary-angles');
    if (names.includes('input_ids')) return this.perToken(v, 'other');
    // Computed from a static cache's write_indices / nonpad_kv_seqlen (and shapes): a length, rebuilt per routed layer.
    const lengthInputs = [...o.data].map(staticLengthRole);
    if (lengthInputs.length && lengthInputs.every((r) => r))
      return { kind: 'sequence-length', value: v, role: lengthInputs.includes('write_indices') ? 'write_indices' : 'nonpad_kv_seqlen' };
    if (o.data.size === 0 && o.shape.size > 0) return { kind: 'sequence-length', value: v, role: 'shape-derived' };
    return {
      kind: 'other',
      value: v,
      reason: this.graphInputs.has(v) ? 'a graph input of unknown role' : `computed from ${names.join(', ') || 'nothing known'}`,
    };
  }

  private mask(v: Value, form: 'raw-2d' | 'additive-bias' | 'key-padding'): SideInput {
    const origin = this.graph.inputs.find((x) => x.name === 'attention_mask');
    if (origin && this.facts.rank(origin) === 4 && this.originsOf(v).data.has(origin)) {
      // The caller's [B, 1, M, M] mask: its batch, query and key axes tracked into v.
      const axes = this.trackedFrom(v, 'attention_mask')?.axes;
      return { kind: 'attention-mask', value: v, form: 'caller-4d', queryAxis: axes?.[1] ?? null, keyAxis: axes?.[2] ?? null };
    }
    const tracked = this.trackedFrom(v, 'attention_mask');
    const rank = this.facts.rank(v);
    if (form === 'additive-bias') {
      const r = rank ?? 4;
      return { kind: 'attention-mask', value: v, form, queryAxis: r - 2, keyAxis: tracked?.axes[1] ?? r - 1 };
    }
    if (rank === 3) return { kind: 'attention-mask', value: v, form, queryAxis: 1, keyAxis: 2 };
    return { kind: 'attention-mask', value: v, form, queryAxis: null, keyAxis: tracked?.axes[1] ?? 1 };
  }

  private perToken(v: Value, role: Extract<SideInput, { kind: 'per-token' }>['role']): SideInput {
    const tracked = this.trackedFrom(v, 'position_ids') ?? this.trackedFrom(v, 'input_ids');
    return { kind: 'per-token', value: v, role, batchAxis: tracked?.axes[0] ?? null, sequenceAxis: tracked?.axes[1] ?? null };
  }

  /**
   * Batch and token axes of `v` if it is computed from the named [B, S] graph input; for the
   * caller's 4-D attention_mask [B, 1, M, M], its batch, query and key axes.
   */
  private trackedFrom(v: Value, inputName: string): AxisFact | undefined {
    const origin = this.graph.inputs.find((x) => x.name === inputName);
    if (!origin) return undefined;
    let map = this.axes.get(origin);
    if (!map) {
      map = trackAxes(this.graph, origin, this.facts.rank(origin) === 4 ? [0, 2, 3] : [0, 1], this.facts, this.isPrefix);
      this.axes.set(origin, map);
    }
    return map.get(v);
  }

  private originsOf(v: Value): Origins {
    const cached = this.origins.get(v);
    if (cached) return cached;
    const o: Origins = { data: new Set(), shape: new Set(), ops: new Set() };
    const stack: [Value, boolean][] = [[v, false]];
    const seen = { data: new Set<Value>(), shape: new Set<Value>() };
    while (stack.length) {
      const [x, viaShape] = stack.pop()!;
      const seenHere = viaShape ? seen.shape : seen.data;
      if (seenHere.has(x)) continue;
      seenHere.add(x);
      if (this.graphInputs.has(x)) (viaShape ? o.shape : o.data).add(x);
      const p = x.producer;
      if (!p || !this.isPrefix(p)) continue;
      if (!viaShape) o.ops.add(p.opType);
      const shapeOnly = viaShape || p.opType === 'Shape';
      for (const i of p.inputs) if (i) stack.push([i, shapeOnly]);
    }
    this.origins.set(v, o);
    return o;
  }
}

/** A graph input a static cache reads as its write index (TensorScatter input 2) or valid-key count (Attention input 6). */
function staticLengthRole(x: Value): 'write_indices' | 'nonpad_kv_seqlen' | null {
  for (const u of x.uses) {
    const slot =
      standardSlot(u.node, u.index) ?? (fusedAttentionSchema(u.node)?.form === 'StandardAttention' ? fusedAttentionSchema(u.node)!.inputs[u.index] : undefined);
    if (slot?.role === 'sequence-length' && (slot.length === 'write_indices' || slot.length === 'nonpad_kv_seqlen')) return slot.length;
  }
  return null;
}

function pastRole(v: Value, kv: KvCacheSpec): 'key' | 'value' | 'key-and-value' | null {
  if (kv.key.input === v && kv.value.input === v) return 'key-and-value';
  if (kv.key.input === v) return 'key';
  if (kv.value.input === v) return 'value';
  return null;
}

/** The schema meaning of the slot a fused op of this layer reads `v` at. */
function slotOf(v: Value, readers: ReadonlySet<Node>): AttentionSlot | undefined {
  for (const u of v.uses) {
    if (!readers.has(u.node)) continue;
    const schema = fusedAttentionSchema(u.node);
    const slot = schema ? schema.inputs[u.index] : isRotaryOp(u.node) ? ROTARY_SLOTS[u.index] : standardSlot(u.node, u.index);
    if (slot) return slot;
  }
  return undefined;
}
