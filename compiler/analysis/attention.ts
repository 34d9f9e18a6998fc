/**
 * Attention cores inside a branch, and the KV cache each reads and writes.
 *
 * Fused ops (com.microsoft Attention / MultiHeadAttention / GroupQueryAttention) name their
 * cache slots in their schema. Unfused attention is Softmax over MatMul(Q, K^T) (plus scale and
 * mask) followed by MatMul(P, V): the key cache is the present output feeding the score MatMul's
 * second operand, the value cache the one feeding the context MatMul's second operand.
 */
import { ModcError } from '../core/errors.js';
import { dependsOn, type Node, type Value } from '../core/ir/graph.js';
import { DataType } from '../core/ir/dtype.js';
import type { GraphFacts } from './graph-facts.js';
import { fusedAttentionSchema, isDefaultDomain, isStandardAttention, isTensorScatter, SCORE_PASS_THROUGH, type FusedAttentionSchema } from './ops.js';
import { staticMaskSemantics, type StaticMaskContext, type StaticMaskSemantics } from './static-mask.js';
import { kvSequenceAxis, type AttentionCore, type KvCacheSpec, type KvTensor } from './types.js';

export interface AttentionContext {
  facts: GraphFacts;
  graphInputs: ReadonlySet<Value>;
  graphOutputs: ReadonlySet<Value>;
  /** Values downstream of the stream start; anything else is prefix (computed from graph inputs alone). */
  dependent: ReadonlySet<Value>;
}

/**
 * Every attention core among `nodes` (a branch), in graph order. A branch with no attention but
 * with state (see `stateTensors`) yields one 'recurrent' core.
 */
export function findAttentionCores(nodes: readonly Node[], ctx: AttentionContext): AttentionCore[] {
  const inBranch = new Set(nodes);
  const cores: AttentionCore[] = [];
  for (const n of nodes) {
    const schema = fusedAttentionSchema(n);
    if (schema && isStandardAttention(n)) cores.push(standardCore(n, ctx));
    else if (schema) cores.push(fusedCore(n, schema, ctx));
    else if (n.opType === 'Softmax' && isDefaultDomain(n)) {
      const core = unfusedCore(n, inBranch, ctx);
      if (core) cores.push(core);
    }
  }
  if (cores.length === 0) {
    const state = stateTensors(nodes, new Set(), ctx);
    if (state.length) {
      const node = nodes.find((n) => n.inputs.some((v) => v && prefixSources(v, ctx).includes(state[0]!.input)))!;
      const kv: KvCacheSpec = { key: state[0]!, value: state[1] ?? state[0]!, layout: 'BHTD', numKvHeads: 0, headSize: 0 };
      cores.push({ form: 'recurrent', node, numHeads: 0, kv });
    }
  }
  return cores;
}

/**
 * State among `nodes` besides the KV cache `exclude`: float graph inputs the nodes read, each
 * with the nearest graph output of its rank and type computed from it (past -> present), in the
 * order first read.
 */
export function stateTensors(nodes: readonly Node[], exclude: ReadonlySet<Value>, ctx: AttentionContext): KvTensor[] {
  const out: KvTensor[] = [];
  for (const n of nodes) {
    for (const read of n.inputs) {
      for (const v of read ? prefixSources(read, ctx) : []) {
        if (exclude.has(v) || ctx.dependent.has(v) || out.some((t) => t.input === v) || ctx.facts.isConstant(v)) continue;
        const dt = ctx.facts.dtype(v);
        if (dt !== DataType.FLOAT && dt !== DataType.FLOAT16 && dt !== DataType.BFLOAT16) continue;
        const output = nearestDownstreamOutput(v, ctx);
        if (output) out.push({ input: v, output });
      }
    }
  }
  return out;
}

/**
 * Every value `v` is computed from through data edges (not through Shape, whose output depends
 * only on a shape), `v` included, in depth-first order; a value `blocked` says is visited but not
 * walked past.
 */
function dataUpstream(v: Value, blocked: (x: Value) => boolean = () => false): Set<Value> {
  const seen = new Set<Value>();
  const stack = [v];
  while (stack.length) {
    const x = stack.pop()!;
    if (seen.has(x)) continue;
    seen.add(x);
    const p = x.producer;
    if (!p || blocked(x) || p.opType === 'Shape') continue;
    for (const i of p.inputs) if (i) stack.push(i);
  }
  return seen;
}

/** The graph inputs a value is computed from through prefix data edges (not through Shape): itself if it is one. */
function prefixSources(v: Value, ctx: AttentionContext): Value[] {
  return [...dataUpstream(v, (x) => ctx.dependent.has(x))].filter((x) => ctx.graphInputs.has(x));
}

/** The graph output of `start`'s rank and element type nearest downstream of it, breadth first. */
function nearestDownstreamOutput(start: Value, ctx: AttentionContext): Value | null {
  const rank = ctx.facts.rank(start);
  const dtype = ctx.facts.dtype(start);
  const downstream = (v: Value) => [...v.uses].flatMap((u) => u.node.outputs);
  const isPresent = (v: Value) => ctx.graphOutputs.has(v) && ctx.facts.rank(v) === rank && ctx.facts.dtype(v) === dtype;
  return breadthFirst(start, downstream, isPresent, false);
}

/**
 * The value nearest `start` (itself included when `includeStart`) that `match` accepts, walking
 * breadth first along `next`.
 */
function breadthFirst(start: Value, next: (v: Value) => readonly Value[], match: (v: Value) => boolean, includeStart: boolean): Value | null {
  let frontier = [start];
  const seen = new Set<Value>();
  while (frontier.length) {
    const after: Value[] = [];
    for (const v of frontier) {
      if (seen.has(v)) continue;
      seen.add(v);
      if ((includeStart || v !== start) && match(v)) return v;
      after.push(...next(v));
    }
    frontier = after;
  }
  return null;
}

function fusedCore(n: Node, schema: FusedAttentionSchema, ctx: AttentionContext): AttentionCore {
  const slot = (role: string) => Number(Object.entries(schema.inputs).find(([, s]) => s.role === role)?.[0] ?? -1);
  const numHeads = n.attrInt('num_heads');
  if (!numHeads) throw new ModcError(`${n.describe()} has no num_heads attribute`);
  const combined = schema.presentKey === schema.presentValue;
  const key = cacheTensor(n, combined ? slot('past-combined') : slot('past-key'), schema.presentKey, ctx);
  const value = combined ? key : cacheTensor(n, slot('past-value'), schema.presentValue, ctx);
  const shape = key.input.shape ?? [];
  const [headsDim, headDim] = combined ? [shape[2], shape[4]] : [shape[1], shape[3]];
  const numKvHeads = n.attrInt('kv_num_heads') ?? (typeof headsDim === 'number' ? headsDim : numHeads);
  // ONNX Runtime reads head counts as int32; modc writes them into ops that check the range.
  for (const [name, v] of [
    ['num_heads', numHeads],
    ['kv_num_heads', numKvHeads],
  ] as const) {
    if (!Number.isSafeInteger(v) || v < 1 || v > 2 ** 31 - 1) throw new ModcError(`${n.describe()} has ${name} ${v}; a head count must be in [1, 2^31 - 1]`);
  }
  const headSize = typeof headDim === 'number' ? headDim : undefined;
  if (!headSize) throw new ModcError(`${n.describe()}: past ${key.input} needs a static head size dim`);
  const kv: KvCacheSpec = { key, value, layout: combined ? 'combined-2BHTD' : 'BHTD', numKvHeads, headSize };
  return { form: schema.form, node: n, numHeads, kv };
}

/**
 * The standard ONNX Attention (opset 23/24). With past_key / past_value it keeps its own cache
 * (present = past + this call's keys, [B, kv heads, T, head]). Without, its K and V must be the
 * buffers TensorScatter wrote: a static cache, a graph input written at write_indices and given
 * back as a graph output, with nonpad_kv_seqlen counting each row's valid keys.
 */
function standardCore(n: Node, ctx: AttentionContext): AttentionCore {
  const q = n.inputs[0]!;
  const qShape = q.shape ?? [];
  const numHeads = n.attrInt('q_num_heads') ?? (qShape.length === 4 && typeof qShape[1] === 'number' ? qShape[1] : undefined);
  if (!numHeads) throw new ModcError(`${n.describe()}: standard Attention needs q_num_heads (3-D inputs) or a static head count on its 4-D query`);
  if (n.inputs[4] || n.inputs[5]) {
    const key = cacheTensor(n, 4, 1, ctx);
    const value = cacheTensor(n, 5, 2, ctx);
    const shape = key.input.shape ?? [];
    const numKvHeads = n.attrInt('kv_num_heads') ?? shape[1];
    if (shape.length !== 4 || typeof numKvHeads !== 'number' || typeof shape[3] !== 'number') {
      throw new ModcError(`${n.describe()}: past_key ${key.input} must be [batch, kv heads, past length, head size] with static heads and head size`);
    }
    return { form: 'StandardAttention', node: n, numHeads, kv: { key, value, layout: 'BHTD', numKvHeads, headSize: shape[3] } };
  }
  const key = staticWrite(n, 1, ctx);
  const value = staticWrite(n, 2, ctx);
  if (!key || !value) {
    throw new ModcError(
      `${n.describe()}: standard Attention with no past_key/past_value must read K and V from TensorScatter writes of a cache buffer (a graph input given back as a graph output): modc needs a KV cache it can follow`,
    );
  }
  if (!n.inputs[6])
    throw new ModcError(
      `${n.describe()}: a static KV cache (TensorScatter) without nonpad_kv_seqlen is not supported: the valid keys of each row must be given`,
    );
  const shape = key.tensor.input.shape ?? [];
  const kvAttr = n.attrInt('kv_num_heads');
  const [layout, numKvHeads, headSize] =
    shape.length === 3
      ? ['static-BTH' as const, kvAttr, typeof shape[2] === 'number' && kvAttr ? shape[2] / kvAttr : undefined]
      : ['static-BHTD' as const, kvAttr ?? shape[1], shape[3]];
  if ((shape.length !== 3 && shape.length !== 4) || typeof numKvHeads !== 'number' || typeof headSize !== 'number' || !Number.isInteger(headSize)) {
    throw new ModcError(
      `${n.describe()}: static cache ${key.tensor.input} must be [batch, max length, kv heads * head size] (with kv_num_heads) or [batch, kv heads, max length, head size], static but for batch and length`,
    );
  }
  for (const w of [key.node, value.node]) {
    const mode = w.attrString('mode') ?? 'linear';
    if (mode !== 'linear')
      throw new ModcError(
        `${w.describe()}: TensorScatter mode '${mode}' is not supported: a circular (ring-buffer) cache overwrites its oldest slots, which a compacted cache cannot follow (only mode 'linear')`,
      );
    const rank = shape.length;
    const axis = w.attrInt('axis', -2) ?? -2;
    const want = layout === 'static-BTH' ? 1 : 2;
    if ((axis + rank) % rank !== want)
      throw new ModcError(
        `${w.describe()}: TensorScatter writes axis ${axis} of ${key.tensor.input}; modc supports static caches written along their sequence axis (${want})`,
      );
  }
  return {
    form: 'StandardAttention',
    node: n,
    numHeads,
    kv: { key: key.tensor, value: value.tensor, layout, numKvHeads, headSize, writes: { key: key.node, value: value.node } },
  };
}

const LAYOUT_OPS = new Set(['Reshape', 'Transpose', 'Identity', 'Cast', 'Unsqueeze', 'Squeeze']);

/** The TensorScatter write feeding Attention input `slot`: past buffer (graph input) -> present (graph output). */
function staticWrite(n: Node, slot: number, ctx: AttentionContext): { tensor: KvTensor; node: Node } | null {
  // The buffer may reach Attention reshaped (3-D -> 4-D heads), transposed or cast.
  let w = n.inputs[slot]?.producer;
  for (let hops = 0; w && LAYOUT_OPS.has(w.opType) && hops < 4; hops++) w = w.inputs[0]?.producer;
  if (!w || !isTensorScatter(w)) return null;
  const input = w.inputs[0];
  const output = w.outputs[0];
  if (!input || !ctx.graphInputs.has(input) || !output || !ctx.graphOutputs.has(output)) return null;
  return { tensor: { input, output }, node: w };
}

function cacheTensor(n: Node, inSlot: number, outSlot: number, ctx: AttentionContext): KvTensor {
  const input = n.inputs[inSlot] ?? null;
  const output = n.outputs[outSlot];
  if (!input || !ctx.graphInputs.has(input))
    throw new ModcError(`${n.describe()}: expected a past KV graph input at input ${inSlot}, found ${input ?? 'none'}`);
  if (!output || !ctx.graphOutputs.has(output))
    throw new ModcError(`${n.describe()}: expected a present KV graph output at output ${outSlot}, found ${output ?? 'none'}`);
  return { input, output };
}

function unfusedCore(softmax: Node, inBranch: ReadonlySet<Node>, ctx: AttentionContext): AttentionCore | null {
  const scores = scoreMatMul(softmax, inBranch);
  const context = contextMatMul(softmax, inBranch);
  if (!scores || !context) return null;
  const key = cacheBehind(scores.inputs[1]!, inBranch, ctx, `${scores.describe()} (Q·K^T)`);
  const value = cacheBehind(context.inputs[1]!, inBranch, ctx, `${context.describe()} (P·V)`);
  const shape = key.input.shape ?? [];
  // One past for both, [2, B, H, T, D]: ORT's combined layout (key at 0, value at 1 of axis 0).
  const combined = key.input === value.input && key.output === value.output && shape.length === 5;
  const [numKvHeads, headSize] = combined ? [shape[2], shape[4]] : [shape[1], shape[3]];
  if ((shape.length !== 4 && !combined) || typeof numKvHeads !== 'number' || typeof headSize !== 'number') {
    throw new ModcError(
      `past key ${key.input} of ${scores.describe()} must be [batch, kv heads, time, head size] (or one [2, batch, kv heads, time, head size] past for key and value) with static heads and head size`,
    );
  }
  const kv: KvCacheSpec = { key, value, layout: combined ? 'combined-2BHTD' : 'BHTD', numKvHeads, headSize };
  const numHeads = headsFromOutputProjection(context, inBranch, headSize, ctx.facts) ?? numKvHeads;
  return { form: 'unfused', scores, softmax, context, numHeads, kv };
}

/** The MatMul(Q, K^T) feeding Softmax through scale, mask, casts. */
function scoreMatMul(softmax: Node, inBranch: ReadonlySet<Node>): Node | null {
  let frontier: Value[] = [softmax.inputs[0]!];
  for (let depth = 0; depth < 8 && frontier.length; depth++) {
    const next: Value[] = [];
    for (const v of frontier) {
      const p = v.producer;
      if (!p || !inBranch.has(p)) continue;
      if (p.opType === 'MatMul') return p;
      if (SCORE_PASS_THROUGH.has(p.opType)) next.push(...p.inputs.filter((i): i is Value => i !== null));
    }
    frontier = next;
  }
  return null;
}

/** The MatMul(P, V) reading the probabilities (through casts or dropout) as its first operand. */
function contextMatMul(softmax: Node, inBranch: ReadonlySet<Node>): Node | null {
  let frontier: Value[] = [softmax.output(0)];
  for (let depth = 0; depth < 4 && frontier.length; depth++) {
    const next: Value[] = [];
    for (const v of frontier) {
      for (const u of v.uses) {
        if (!inBranch.has(u.node)) continue;
        if (u.node.opType === 'MatMul' && u.index === 0) return u.node;
        if (SCORE_PASS_THROUGH.has(u.node.opType)) next.push(u.node.output(0));
      }
    }
    frontier = next;
  }
  return null;
}

/**
 * The cache behind an operand of the score or context MatMul, followed by dataflow:
 * - the present is a graph output upstream of the operand (`present = Concat(past, new)` feeding
 *   the attention), and the past the float graph input of rank 4 nearest upstream of it;
 * - otherwise the past is the float graph input of rank 4, or 5 for a combined [2, B, H, T, D]
 *   cache, nearest upstream of the operand through the branch and through nodes that read no
 *   stream value (a combined past cut by Split/Squeeze before the Concat), and the present is the
 *   graph output of the past's rank and type nearest downstream of it (stacked after the Concat).
 */
function cacheBehind(operand: Value, inBranch: ReadonlySet<Node>, ctx: AttentionContext, what: string): KvTensor {
  const output = nearestUpstream(operand, inBranch, (v) => ctx.graphOutputs.has(v));
  if (output) {
    const isPast = (v: Value) => ctx.graphInputs.has(v) && ctx.facts.rank(v) === 4 && v !== operand;
    const input = nearestUpstream(output, inBranch, isPast, true);
    if (!input) throw new ModcError(`no KV cache: present ${output} (feeding ${what}) is not computed from a past graph input`);
    return { input, output };
  }
  const upstream = (v: Value) => {
    const p = v.producer;
    return p && p.opType !== 'Shape' && (inBranch.has(p) || !ctx.dependent.has(v)) ? p.inputs.filter((i): i is Value => i !== null) : [];
  };
  const isPast = (v: Value) => {
    if (v === operand || !ctx.graphInputs.has(v) || ctx.facts.isConstant(v)) return false;
    const dt = ctx.facts.dtype(v);
    const rank = ctx.facts.rank(v);
    return (dt === DataType.FLOAT || dt === DataType.FLOAT16 || dt === DataType.BFLOAT16) && (rank === 4 || rank === 5);
  };
  const input = breadthFirst(operand, upstream, isPast, false);
  if (!input) throw new ModcError(`no KV cache: the second operand of ${what} comes from neither a present graph output nor a past graph input`);
  const present = nearestDownstreamOutput(input, ctx);
  if (!present) throw new ModcError(`no KV cache: past ${input} (feeding ${what}) has no present graph output of its rank and type computed from it`);
  return { input, output: present };
}

/**
 * Breadth-first upstream search through branch nodes along data edges: a Shape node carries no
 * data, so shape arithmetic never leads to the other cache.
 */
function nearestUpstream(start: Value, inBranch: ReadonlySet<Node>, match: (v: Value) => boolean, skipStart = false): Value | null {
  const upstream = (v: Value) => {
    const p = v.producer;
    return p && inBranch.has(p) && p.opType !== 'Shape' ? p.inputs.filter((i): i is Value => i !== null) : [];
  };
  return breadthFirst(start, upstream, match, !skipStart);
}

const projectionHeads = (rows: unknown, headSize: number): number | undefined =>
  typeof rows === 'number' && rows % headSize === 0 ? rows / headSize : undefined;

/** Heads from the output projection after P·V: its weight is [heads * head size, hidden]. */
function headsFromOutputProjection(context: Node, inBranch: ReadonlySet<Node>, headSize: number, facts: GraphFacts): number | undefined {
  let frontier: Value[] = [context.output(0)];
  for (let depth = 0; depth < 6 && frontier.length; depth++) {
    const next: Value[] = [];
    for (const v of frontier) {
      for (const u of v.uses) {
        const n = u.node;
        if (!inBranch.has(n)) continue;
        const w = n.inputs[1];
        // Quantized projections: MatMulNBits records K; a dequantized or integer weight has its initializer's rows.
        if (n.opType === 'MatMulNBits') return projectionHeads(n.attrInt('K'), headSize);
        if ((n.opType === 'MatMul' || n.opType === 'Gemm' || n.opType === 'MatMulInteger') && w && facts.isConstant(w)) {
          const shape = w.shape ?? (w.producer?.opType === 'DequantizeLinear' ? w.producer.inputs[0]?.shape : undefined);
          return shape?.length === 2 ? projectionHeads(shape[0], headSize) : undefined;
        }
        next.push(...n.outputs);
      }
    }
    frontier = next;
  }
  return undefined;
}

/** GroupQueryAttention input slots (com.microsoft, ONNX Runtime 1.29). */
export const GQA_POSITION_IDS = 9;
export const GQA_ATTENTION_BIAS = 10;
export const GQA_HEAD_SINK = 11;

/**
 * What a GroupQueryAttention node numbers by cache slot: its rotary angles (do_rotary; the op
 * ignores a position_ids input in a prefill) and its sliding window (local_window_size >= 0; null: none). A compacted
 * cache renumbers the slots, so route-layers ties both back to original positions
 * (compiler/passes/window-mask.ts). Null for any other attention.
 */
export function slotNumbered(core: AttentionCore): { node: Node; rotary: boolean; window: number | null } | null {
  if (core.form !== 'GroupQueryAttention') return null;
  const node = core.node;
  const rotary = node.attrInt('do_rotary', 0) === 1;
  const w = node.attrInt('local_window_size', -1) ?? -1;
  return { node, rotary, window: w >= 0 ? w : null };
}

/**
 * The static-cache context of a standard Attention reading TensorScatter buffers: the inputs its
 * mask may be computed from (compiler/analysis/static-mask.ts).
 */
function staticMaskContext(core: AttentionCore & { node: Node }): StaticMaskContext {
  const graph = core.node.graph;
  const inputs = new Set(graph?.inputs ?? []);
  const source = (v: Value | null): Value | null => {
    for (let cur = v, hops = 0; cur && hops < 4; hops++) {
      if (inputs.has(cur)) return cur;
      const p = cur.producer;
      cur = p && (p.opType === 'Cast' || p.opType === 'Identity') ? p.input(0) : null;
    }
    return v;
  };
  const buffers = new Map<Value, number>();
  for (const n of graph?.nodes ?? []) {
    if (!isTensorScatter(n)) continue;
    const rank = n.input(0)?.shape?.length ?? 3;
    const axis = ((n.attrInt('axis', -2) ?? -2) + rank) % rank;
    for (const v of [n.input(0), n.outputs[0]]) if (v) buffers.set(v, axis);
  }
  const seqAxis = kvSequenceAxis(core.kv.layout);
  const length = core.kv.key.input.shape?.[seqAxis];
  return {
    write: source(core.kv.writes?.key.input(2) ?? null),
    nonpad: source(core.node.input(6)),
    buffers,
    length: typeof length === 'number' ? length : null,
    tokenInputs: new Set([...inputs].filter((v) => ['input_ids', 'inputs_embeds', 'position_ids'].includes(v.name))),
  };
}

const staticMasks = new WeakMap<Value, StaticMaskSemantics | { reason: string }>();

/** What the attn_mask of a static-cache layer computes, or why it cannot be read; null for other layers. */
export function staticMaskOf(core: AttentionCore): StaticMaskSemantics | { reason: string } | null {
  if (core.form !== 'StandardAttention' || !core.kv.writes) return null;
  const mask = core.node.input(3);
  if (!mask) return null;
  let m = staticMasks.get(mask);
  if (!m) {
    m = staticMaskSemantics(mask, staticMaskContext(core));
    staticMasks.set(mask, m);
  }
  return m;
}

const growingMasks = new WeakMap<Value, StaticMaskSemantics | { reason: string }>();

/**
 * Whether the attn_mask of a standard Attention with a growing cache (past and present, no
 * TensorScatter) is causality and the keys attention_mask sets, nothing else: read as
 * compiler/analysis/static-mask.ts reads a static cache's, with the key count M, the call's S
 * tokens and attention_mask[b, j] as its symbols. A compacted layer then needs no rebuilt mask:
 * is_causal=1 and its own valid keys say the same (compiler/passes/layer-cache.ts).
 */
export function causalKeyMask(core: AttentionCore): boolean {
  if (core.form !== 'StandardAttention' || core.kv.writes) return false;
  const mask = core.node.input(3);
  const m = mask ? growingMaskSemantics(mask) : null;
  return m !== null && m.window === null && (m.causal || core.node.attrInt('is_causal', 0) === 1);
}

/** A growing-cache mask read with M, S and attention_mask[b, j] as symbols, or null if unread. */
function growingMaskSemantics(mask: Value): StaticMaskSemantics | null {
  const graph = mask.graph ?? mask.producer?.graph;
  const keys = graph?.inputs.find((v) => v.name === 'attention_mask');
  if (!graph || !keys || keys.shape?.length !== 2) return null;
  let m = growingMasks.get(mask);
  if (!m) {
    const tokenInputs = new Set(graph.inputs.filter((v) => ['input_ids', 'inputs_embeds', 'position_ids'].includes(v.name)));
    m = staticMaskSemantics(mask, { write: null, nonpad: null, buffers: new Map([[keys, 1]]), length: null, tokenInputs, keyMask: keys });
    growingMasks.set(mask, m);
  }
  return 'reason' in m ? null : m;
}

/**
 * Unfused attention whose only mask is one additive bias that is causality and attention_mask's
 * keys, nothing else: the Add on the way from Q·K^T to Softmax and the bias's input slot. The way
 * may also scale by constants and cast; anything else on it (a Where, a second Add) gives null.
 * A compacted layer then builds that bias from its own valid keys (compiler/passes/layer-cache.ts).
 */
export function causalKeyBias(core: AttentionCore): { add: Node; slot: number } | null {
  if (core.form !== 'unfused') return null;
  let found: { add: Node; slot: number } | null = null;
  let v: Value | null = core.softmax.inputs[0] ?? null;
  for (let hops = 0; v && v.producer !== core.scores && hops < 8; hops++) {
    const p: Node | null = v.producer;
    const [a, b] = p?.inputs ?? [];
    if (!p || !a) return null;
    if (p.opType === 'Cast') {
      v = a;
    } else if ((p.opType === 'Mul' || p.opType === 'Div') && b) {
      // A scale: one operand a constant (a Div's divisor).
      if (isConstant(b)) v = a;
      else if (p.opType === 'Mul' && isConstant(a)) v = b;
      else return null;
    } else if (p.opType === 'Add' && b && !found) {
      // The bias is the operand that Q·K^T does not reach (an Add is float: the bias is additive).
      const fromScores = dependsOn(a, core.scores.output(0));
      if (fromScores === dependsOn(b, core.scores.output(0))) return null;
      found = { add: p, slot: fromScores ? 1 : 0 };
      v = fromScores ? a : b;
    } else {
      return null;
    }
  }
  if (!v || v.producer !== core.scores || !found) return null;
  const m = growingMaskSemantics(found.add.inputs[found.slot]!);
  return m && m.causal && m.window === null ? found : null;
}

function isConstant(v: Value): boolean {
  return v.initializer !== null || v.producer?.opType === 'Constant';
}

/**
 * The sliding window (in slots of the original buffer, which are positions) a static-cache
 * layer's mask applies, or null. A compacted layer applies it by original position
 * (compiler/passes/static-cache.ts).
 */
export function staticWindow(core: AttentionCore): number | null {
  const m = staticMaskOf(core);
  return m && !('reason' in m) ? m.window : null;
}

/**
 * Why a layer's KV cache cannot be compacted, or null. GroupQueryAttention's local_window_size
 * (sliding-window attention) counts cache slots; a compacted layer gets it as a mask by original
 * position instead (compiler/passes/window-mask.ts), which needs the positions of this call's tokens
 * (its position_ids input, or attention_mask) and no attention_bias of its own to merge with.
 * A static cache's attn_mask must be read as causality, a window and validity (static-mask.ts);
 * its window too is then applied by original position (compiler/passes/static-cache.ts).
 * Such a layer otherwise stays dense (its MLP part may still route).
 */
export function kvCompactionBlocker(core: AttentionCore): string | null {
  if (core.form === 'StandardAttention' && core.kv.writes && core.node.inputs[3] && readsPositions(core.node.inputs[3])) {
    return `the attn_mask of ${core.node.describe()} is computed from position_ids: it compares cache slots with positions, which a compacted buffer renumbers; the layer's KV cache is kept full`;
  }
  const mask = staticMaskOf(core);
  if (mask && core.form === 'StandardAttention') {
    const causalOp = core.node.attrInt('is_causal', 0) === 1;
    if ('reason' in mask) return `the attn_mask of ${core.node.describe()} ${mask.reason}; the layer's KV cache is kept full`;
    if (!mask.causal && !causalOp) {
      return `the attn_mask of ${core.node.describe()} does not hide later slots (no slot <= write_indices + t) and is_causal=0: modc routes causal attention only; the layer's KV cache is kept full`;
    }
    if (mask.window !== null && causalOp) {
      return `${core.node.describe()} takes a sliding-window attn_mask with is_causal=1, which modc does not rebuild by position; the layer's KV cache is kept full`;
    }
  }
  if (core.form === 'StandardAttention' && core.kv.layout === 'BHTD' && !core.node.inputs[3] && core.node.attrInt('is_causal', 0) !== 1) {
    return `${core.node.describe()} has neither an attn_mask nor is_causal=1: modc routes causal attention only`;
  }
  const s = slotNumbered(core);
  if (!s || s.window === null) return null;
  const what = `sliding-window attention (${s.node.describe()} local_window_size=${s.window})`;
  if (s.window === 0) return `${what}: a window of 0 slots is not supported; the layer's KV cache is kept full`;
  if (s.node.input(GQA_ATTENTION_BIAS))
    return `${what} also takes an attention_bias input, which modc does not merge with a window by position; the layer's KV cache is kept full`;
  if (!s.node.input(GQA_POSITION_IDS) && !s.node.graph?.inputs.some((v) => v.name === 'attention_mask')) {
    return `${what}: the model has no attention_mask input to take original positions from; the layer's KV cache is kept full`;
  }
  return null;
}

/** Whether `v` is computed from the position_ids graph input through data (not only its shape). */
function readsPositions(v: Value): boolean {
  return [...dataUpstream(v)].some((x) => x.name === 'position_ids' && !x.producer);
}
