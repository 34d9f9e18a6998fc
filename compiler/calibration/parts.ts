/** The routable parts of a decoder layer (SPEC.md "Sub-layer routing") and their keys. */
export type RoutedPart = 'block' | 'attention' | 'mlp';

export const PARTS: readonly RoutedPart[] = ['block', 'attention', 'mlp'];

export type Granularity = 'auto' | RoutedPart;

/** One routed part of one layer. */
export interface PartRef {
  layer: number;
  part: RoutedPart;
}

export const partKey = (p: PartRef): string => `${p.layer}.${p.part}`;

/** The parts `granularity` lets calibration route. */
export function allowedParts(granularity: Granularity): RoutedPart[] {
  return granularity === 'auto' ? [...PARTS] : [granularity];
}
