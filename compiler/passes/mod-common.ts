/** What the MoD passes share: the stream's element type and finding a layer's routing nodes. */
import type { DecoderStructure } from '../analysis/types.js';
import { DataType } from '../core/ir/dtype.js';
import type { Graph, Node, Value } from '../core/ir/graph.js';
import type { TypeProto } from '../core/proto/index.js';
import { MODC_DOMAIN } from './modc-ops/index.js';

export function streamElementType(s: DecoderStructure): number {
  return s.dtype === 'float16' ? DataType.FLOAT16 : s.dtype === 'bfloat16' ? DataType.BFLOAT16 : DataType.FLOAT;
}

/** The element type of a value, without shape (a branch output's declared type: lengths differ between branches). */
export function elementType(v: Value): TypeProto | undefined {
  const elem = v.dtype;
  return elem === undefined ? undefined : ({ tensor_type: { elem_type: elem } } as TypeProto);
}

/** The routing a layer got from insert-routers: Router -> Select* -> CompactTokens on its residual input. */
export interface LayerRouting {
  score: Value;
  /** The selection CompactTokens reads: bool [B, S]. */
  selected: Value;
  indices: Value;
  valid: Value;
  count: Value;
  /**
   * Each slot's (row, position) pair [B,K,2], whether any row selects a token, and the
   * TokenGrid values the compaction read: null in a model compiled with Compact (before
   * CompactTokens), which a compile never routes again.
   */
  slots: Value | null;
  any: Value | null;
  grid: Value[] | null;
  nodes: Node[];
}

const isModc = (n: Node, op: string) => n.domain === MODC_DOMAIN && n.opType === op;

/** The routing around a selection value (the `selected` the routing metadata names): Router -> Select* -> CompactTokens (or Compact). */
export function routingOf(selected: Value): LayerRouting | null {
  const select = selected.producer;
  if (!select || !(isModc(select, 'SelectThreshold') || isModc(select, 'SelectTopK'))) return null;
  const score = select.input(0);
  const router = score?.producer;
  const compact = selected.consumers().find((n) => isModc(n, 'CompactTokens') || isModc(n, 'Compact'));
  if (!score || !router || !isModc(router, 'Router') || !compact) return null;
  const tokens = compact.opType === 'CompactTokens';
  return {
    score,
    selected,
    indices: compact.output(0),
    valid: compact.output(1),
    count: compact.output(2),
    slots: tokens ? compact.output(3) : null,
    any: tokens ? compact.output(4) : null,
    grid: tokens ? compact.inputs.slice(1).map((v) => v!) : null,
    nodes: [router, select, compact],
  };
}

/** The graph output `v` now leaves through `by`: `by` takes its place, name and type; `v` is renamed with `suffix`. */
export function passOutput(g: Graph, v: Value, by: Value, suffix: string): void {
  const name = v.name;
  v.name = g.uniqueName(`${name}${suffix}`);
  by.name = name;
  by.type = v.type;
  g.outputs = g.outputs.map((o) => (o === v ? by : o));
}
