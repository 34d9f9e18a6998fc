/** Model-wide facts read off the layers: sizes, dtype, positional scheme, and the shared mask. */
import { ModcError } from '../core/errors.js';
import { DataType } from '../core/ir/dtype.js';
import type { Graph, Node, Value } from '../core/ir/graph.js';
import type { GraphFacts } from './graph-facts.js';
import { isRotaryOp, isStandardRotary } from './ops.js';
import type { EmbeddingInfo, FloatType, LayerInfo, MaskInfo, PositionalScheme } from './types.js';

const FLOAT_TYPES: Record<number, FloatType> = { [DataType.FLOAT]: 'float32', [DataType.FLOAT16]: 'float16', [DataType.BFLOAT16]: 'bfloat16' };

export function streamDtype(embedding: EmbeddingInfo, facts: GraphFacts): FloatType {
  const code = facts.dtype(embedding.output) ?? facts.dtype(embedding.table);
  const t = code === undefined ? undefined : FLOAT_TYPES[code];
  if (!t) throw new ModcError(`the residual stream ${embedding.output} has no float element type (found ${code ?? 'unknown'})`);
  return t;
}

export function hiddenSizeOf(embedding: EmbeddingInfo): number {
  const h = embedding.table === embedding.output ? embedding.table.shape?.[2] : embedding.table.shape?.[1];
  if (typeof h !== 'number') throw new ModcError(`embedding table ${embedding.table} has no static hidden size`);
  if (!Number.isSafeInteger(h) || h < 1) throw new ModcError(`embedding table ${embedding.table} declares hidden size ${h}; it must be a positive integer`);
  return h;
}

export function positionalScheme(embedding: EmbeddingInfo, layers: readonly LayerInfo[]): PositionalScheme {
  const nodes = layers.flatMap((l) => l.nodes);
  if (nodes.some((n) => isRotaryOp(n) || isStandardRotary(n))) return 'rotary-op';
  if (layers.some((l) => l.attention.form === 'GroupQueryAttention' && l.attention.node.attrInt('do_rotary', 0) === 1)) return 'rotary-gqa';
  const sides = layers.flatMap((l) => l.sideInputs);
  if (sides.some((s) => s.kind === 'per-token' && (s.role === 'rotary-cos' || s.role === 'rotary-sin'))) return 'rotary-graph';
  if (embedding.positionTable) return 'absolute';
  return 'none';
}

/**
 * The mask as the layers read it (bias, raw mask, or seqlens_k + total_sequence_length), the
 * graph inputs it comes from, and the prefix nodes that build it.
 */
export function maskInfo(graph: Graph, layers: readonly LayerInfo[], isShared: (n: Node) => boolean, order: ReadonlyMap<Node, number>): MaskInfo {
  const outputs: Value[] = [];
  let form: MaskInfo['form'] = 'none';
  for (const s of layers.flatMap((l) => l.sideInputs)) {
    const lengths = s.kind === 'sequence-length' && (s.role === 'seqlens_k' || s.role === 'total_sequence_length');
    if (s.kind !== 'attention-mask' && !lengths) continue;
    if (!outputs.includes(s.value)) outputs.push(s.value);
    if (lengths) form = 'seqlens';
    else if (form === 'none' && s.kind === 'attention-mask') form = s.form;
  }
  const nodes = new Set<Node>();
  const inputs = new Set<Value>();
  const graphInputs = new Set(graph.inputs);
  const stack = [...outputs];
  while (stack.length) {
    const v = stack.pop()!;
    if (graphInputs.has(v)) inputs.add(v);
    const p = v.producer;
    if (!p || !isShared(p) || nodes.has(p)) continue;
    nodes.add(p);
    for (const i of p.inputs) if (i) stack.push(i);
  }
  const sorted = [...nodes].sort((a, b) => order.get(a)! - order.get(b)!);
  return { form, inputs: [...inputs].filter((v) => !v.isConstant), outputs, nodes: sorted };
}
