/** What the MoD passes share: the stream's element type and finding a layer's routing nodes. */
import type { DecoderStructure } from '../analysis/types.js';
import { DataType } from '../core/ir/dtype.js';
import type { Node, Value } from '../core/ir/graph.js';
import { MODC_DOMAIN } from './modc-ops/index.js';

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

/** The routing around a selection value (the `selected` the routing metadata names): Router -> Select* -> Compact. */
export function routingOf(selected: Value): LayerRouting | null {
  const select = selected.producer;
  if (!select || !(isModc(select, 'SelectThreshold') || isModc(select, 'SelectTopK'))) return null;
  const score = select.input(0);
  const router = score?.producer;
  const compact = selected.consumers().find((n) => isModc(n, 'Compact'));
  if (!score || !router || !isModc(router, 'Router') || !compact) return null;
  return { score, indices: compact.output(0), valid: compact.output(1), count: compact.output(2), nodes: [router, select, compact] };
}
