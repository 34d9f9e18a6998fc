/**
 * Where a compiled model decides which tokens run each routed part: the bool [B, S] selection
 * value per (layer, part), named in the `modc.routing` metadata (`layers[].selected`), or found
 * as the output of the layer's modc.Select* node when the metadata predates that field.
 * `exposeSelections` makes them graph outputs, in memory, so a run reports what ran.
 */
import { ModcError } from '../../core/errors.js';
import { DataType } from '../../core/ir/dtype.js';
import type { Value } from '../../core/ir/graph.js';
import type { Model } from '../../core/ir/model.js';
import type { RoutedPart } from '../../routing/router-weights.js';
import type { RoutingMetadata } from '../../metadata/routing-metadata.js';

export type Part = RoutedPart;

export interface Selection {
  layer: number;
  part: Part;
  /** The graph output holding the mask (true = the token ran this part; padding is false). */
  output: string;
}

const ROUTER_WEIGHT = /^modc\.router\.(\d+)(?:\.(attn|mlp|kv))?\.weight$/;

export function exposeSelections(model: Model, routing: RoutingMetadata): Selection[] {
  const g = model.graph;
  const found = selectNodeOutputs(model);
  return routing.layers.map((entry) => {
    const part = entry.part;
    const value = entry.selected ? g.findValue(entry.selected) : found.get(`${entry.layer}/${part}`);
    if (!value) {
      const where = entry.selected ? `the value '${entry.selected}' named in modc.routing` : 'a modc.Select node (compiled with --inline-ops?)';
      throw new ModcError(`cannot find the token selection of layer ${entry.layer} (${part}): no ${where}`);
    }
    if (!g.outputs.includes(value)) {
      value.type ??= { tensor_type: { elem_type: DataType.BOOL } };
      g.outputs.push(value);
    }
    return { layer: entry.layer, part, output: value.name };
  });
}

/** `layer/part` -> the output of the Select node fed by that part's router. */
function selectNodeOutputs(model: Model): Map<string, Value> {
  const out = new Map<string, Value>();
  for (const n of model.graph.nodes) {
    if (n.domain !== 'modc' || !n.opType.startsWith('Select')) continue;
    const router = n.input(0)?.producer;
    const m = router?.domain === 'modc' && router.opType === 'Router' ? ROUTER_WEIGHT.exec(router.input(1)?.name ?? '') : null;
    if (m && n.outputs[0]) out.set(`${m[1]}/${m[2] === 'attn' ? 'attention' : (m[2] ?? 'block')}`, n.outputs[0]);
  }
  return out;
}
