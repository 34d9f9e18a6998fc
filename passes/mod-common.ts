/** What the MoD passes share: the stream's element type and finding a layer's routing nodes. */
import type { DecoderStructure, LayerInfo } from '../compiler/analysis/types.js';
import { DataType } from '../compiler/ir/dtype.js';
import type { Node, Value } from '../compiler/ir/graph.js';
import { MODC_DOMAIN } from '../runtime-ops/index.js';

export function streamElementType(s: DecoderStructure): number {
  return s.dtype === 'float16' ? DataType.FLOAT16 : s.dtype === 'bfloat16' ? DataType.BFLOAT16 : DataType.FLOAT;
}

/** The routing a layer got from insert-routers: Router -> Select* -> Compact on its residual input. */
export interface LayerRouting {
  score: Value;
  indices: Value;
  valid: Value;
  count: Value;
  nodes: Node[];
}

const isModc = (n: Node, op: string) => n.domain === MODC_DOMAIN && n.opType === op;

export function findRouting(layer: LayerInfo): LayerRouting | null {
  const router = layer.residualIn.consumers().find((n) => isModc(n, 'Router'));
  if (!router) return null;
  const score = router.output(0);
  const select = score.consumers().find((n) => isModc(n, 'SelectThreshold') || isModc(n, 'SelectTopK'));
  const compact = select?.output(0).consumers().find((n) => isModc(n, 'Compact'));
  if (!select || !compact) return null;
  return { score, indices: compact.output(0), valid: compact.output(1), count: compact.output(2), nodes: [router, select, compact] };
}
