/**
 * Projections by a constant weight, in the forms exporters write them: a float MatMul/Gemm, a
 * MatMul of DequantizeLinear'd integer weights (QDQ), MatMulInteger with integer weights, and
 * com.microsoft MatMulNBits (block-quantized 2/4/8-bit weights). What a cost model counts and
 * what the analysis treats as a weight (the weight operands are constants, so side inputs of
 * kind 'weight').
 */
import type { Node, Value } from '../core/ir/graph.js';
import type { GraphFacts } from './graph-facts.js';
import { isDefaultDomain, MS_DOMAIN } from './ops.js';

export interface WeightMatMul {
  node: Node;
  form: 'float' | 'dequantized' | 'integer' | 'nbits';
  /** The weight operand (packed for MatMulNBits). */
  weight: Value;
  /** Reduction size K and output features N, when static. */
  inFeatures: number | null;
  outFeatures: number | null;
}

const dim = (v: Value, i: number): number | null => {
  const d = v.shape?.[i];
  return typeof d === 'number' ? d : null;
};

/** The weight projection `n` performs, or null when it is not one (e.g. Q·K^T, whose operands are activations). */
export function weightMatMul(n: Node, facts: GraphFacts): WeightMatMul | null {
  if (n.domain === MS_DOMAIN && n.opType === 'MatMulNBits') {
    const weight = n.inputs[1];
    if (!weight || !facts.isConstant(weight)) return null;
    return { node: n, form: 'nbits', weight, inFeatures: n.attrInt('K') ?? null, outFeatures: n.attrInt('N') ?? null };
  }
  if (!isDefaultDomain(n) || !['MatMul', 'Gemm', 'MatMulInteger'].includes(n.opType)) return null;
  const weight = n.inputs[1];
  if (!weight || !facts.isConstant(weight)) return null;
  const transposed = n.opType === 'Gemm' && n.attrInt('transB', 0) === 1;
  const shaped = weight.producer?.opType === 'DequantizeLinear' ? weight.producer.inputs[0]! : weight;
  const form = n.opType === 'MatMulInteger' ? 'integer' : weight.producer?.opType === 'DequantizeLinear' ? 'dequantized' : 'float';
  const rank = shaped.shape?.length ?? 0;
  const [k, nOut] = transposed ? [dim(shaped, 1), dim(shaped, 0)] : [dim(shaped, rank - 2), dim(shaped, rank - 1)];
  return { node: n, form, weight, inFeatures: k, outFeatures: nOut };
}

/** Every weight projection among `nodes`, in their order. */
export function weightMatMuls(nodes: readonly Node[], facts: GraphFacts): WeightMatMul[] {
  return nodes.map((n) => weightMatMul(n, facts)).filter((w): w is WeightMatMul => w !== null);
}
