/**
 * The normalised input u of a layer's MLP part: the value its first weight multiplications read
 * (the output of the MLP step's norm; SPEC.md, "MLP routed with a surrogate"). A surrogate reads
 * it, so the compiler, the reference executor and calibration find it the same way:
 *
 *   the part's nodes that multiply by a weight (MatMul, Gemm, FusedMatMul, MatMulNBits, the
 *   quantized matmuls), whose activation operand no other such node of the part computes
 *   (gate_proj and up_proj, or c_fc), must all read one value u; `nodes` computes u from the
 *   part's input (the norm), in graph order, and is empty when u is the input itself.
 */
import type { Node, Value } from '../core/ir/graph.js';
import type { SubLayer } from './sub-layers.js';

/** Weight-multiplying ops and the input slots that may hold the weight. */
const WEIGHT_SLOTS: Record<string, number[]> = {
  MatMul: [0, 1],
  Gemm: [0, 1],
  FusedMatMul: [0, 1],
  MatMulNBits: [1],
  MatMulInteger: [0, 1],
  MatMulIntegerToFloat: [0, 1],
  DynamicQuantizeMatMul: [1],
};

export interface MlpInput {
  /** u: what the MLP's first weight multiplications read. */
  value: Value;
  /** The part's nodes computing u from the part's input, in graph order (the norm). */
  nodes: Node[];
}

/** u of an MLP part, or why the part has no single normalised input a surrogate can read. */
export function mlpInputOf(sub: SubLayer): MlpInput | { reason: string } {
  const weights = new Set(sub.sideInputs.filter((s) => s.kind === 'weight').map((s) => s.value));
  const region = new Set(sub.nodes);
  const activation = (n: Node): Value | null => {
    const slots = WEIGHT_SLOTS[n.opType];
    if (!slots || !(n.domain === '' || n.domain === 'com.microsoft')) return null;
    const w = slots.find((i) => n.input(i) && (weights.has(n.input(i)!) || n.input(i)!.isConstant));
    if (w === undefined) return null;
    const other = w === 0 ? 1 : 0;
    return n.input(other);
  };
  const multiplies = sub.nodes.filter((n) => activation(n) !== null);
  if (multiplies.length === 0) return { reason: `its MLP ${sub.update} multiplies by no weight modc recognises` };
  // Nodes downstream of some weight multiplication.
  const after = new Set<Node>();
  for (const n of sub.nodes) {
    if (n.inputs.some((v) => v?.producer && region.has(v.producer) && (after.has(v.producer) || multiplies.includes(v.producer)))) after.add(n);
  }
  const first = multiplies.filter((n) => !after.has(n));
  const read = [...new Set(first.map((n) => activation(n)!))];
  if (read.length !== 1)
    return { reason: `its MLP's first weight multiplications read ${read.length} different values (${read.join(', ')}), not one normalised input` };
  const u = read[0]!;
  if (u === sub.input) return { value: u, nodes: [] };
  if (!u.producer || !region.has(u.producer))
    return { reason: `its MLP's first weight multiplications read ${u}, which the MLP part does not compute from its input` };
  // The backward slice of u inside the part.
  const slice = new Set<Node>();
  const stack: Node[] = [u.producer];
  while (stack.length) {
    const n = stack.pop()!;
    if (slice.has(n)) continue;
    slice.add(n);
    for (const v of n.inputs) if (v?.producer && region.has(v.producer)) stack.push(v.producer);
  }
  const nodes = sub.nodes.filter((n) => slice.has(n));
  const reads = nodes.flatMap((n) => n.inputs).find((v) => v && v !== sub.input && !v.isConstant && !weights.has(v) && !(v.producer && slice.has(v.producer)));
  if (reads) return { reason: `the norm before its MLP reads ${reads}, besides its input ${sub.input} and weights` };
  return { value: u, nodes };
}
