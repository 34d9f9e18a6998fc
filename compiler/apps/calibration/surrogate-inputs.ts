/** The value each layer's MLP surrogate reads (u, the MLP's normalised input), for capture. */
import { mlpInputOf } from '../../analysis/mlp-input.js';
import { subLayersOf } from '../../analysis/sub-layers.js';
import type { DecoderStructure } from '../../analysis/types.js';
import type { Model } from '../../core/ir/model.js';

/** Per layer: the name of u, or null when the layer's MLP has no single normalised input (no surrogate). */
export function mlpInputNames(model: Model, s: DecoderStructure): (string | null)[] {
  const outputs = new Set(model.graph.outputs);
  return s.layers.map((l) => {
    const parts = subLayersOf(l, outputs);
    if ('reason' in parts) return null;
    const u = mlpInputOf(parts.mlp);
    return 'reason' in u ? null : u.value.name;
  });
}
