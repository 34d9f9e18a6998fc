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

/** The parts `granularity` lets calibration route. */
export function allowedParts(granularity: Granularity): RoutedPart[] {
  return granularity === 'auto' ? [...ROUTED_PARTS] : [granularity];
}
