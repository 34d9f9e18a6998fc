/** The routable parts of a decoder layer (SPEC.md "Sub-layer routing") and their keys. */
import { ROUTED_PARTS, type RoutedPart } from '../../routing/router-weights.js';

export { ROUTED_PARTS, type RoutedPart };

export type Granularity = 'auto' | RoutedPart;

/** One routed part of one layer. */
export interface PartRef {
  layer: number;
  part: RoutedPart;
}

export const partKey = (p: PartRef): string => `${p.layer}.${p.part}`;

/** The parts compute calibration may route: kv parts save memory, not compute, and have their own calibration (kv-calibrate.ts). */
export const COMPUTE_PARTS: readonly RoutedPart[] = ['block', 'attention', 'mlp'];

/** The parts `granularity` lets calibration route. */
export function allowedParts(granularity: Granularity): RoutedPart[] {
  return granularity === 'auto' ? [...COMPUTE_PARTS] : [granularity];
}
