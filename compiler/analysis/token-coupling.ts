/**
 * Ops that couple the tokens of a call: their output at one token depends on every other token
 * of the tensor, not through attention but through a statistic taken over the whole input.
 * Dynamic activation quantization is the common case: `DynamicQuantizeLinear` (and ORT's fused
 * `DynamicQuantizeMatMul`) compute one scale and zero point from the minimum and maximum of the
 * whole activation tensor. A routed layer runs on its selected tokens only, so it would quantize
 * them with another scale than the dense model does: the all-pass compile would not equal the
 * original. Such a region stays dense.
 */
import type { Node } from '../core/ir/graph.js';
import { quote } from '../core/errors.js';

const COUPLING: Record<string, string> = {
  DynamicQuantizeLinear: 'quantizes its input with one scale taken over all tokens of the call',
  DynamicQuantizeMatMul: 'quantizes its input with one scale taken over all tokens of the call',
};

/** Why a region with these nodes cannot run on a subset of its tokens, or null. */
export function tokenCouplingBlocker(nodes: Iterable<Node>): string | null {
  for (const n of nodes) {
    const why = COUPLING[n.opType];
    if (why && (n.domain === '' || n.domain === 'ai.onnx' || n.domain === 'com.microsoft')) {
      return `${n.opType} ${quote(n.name)} ${why}, so the selected tokens alone cannot reproduce it (dynamic activation quantization is not routed)`;
    }
  }
  return null;
}
