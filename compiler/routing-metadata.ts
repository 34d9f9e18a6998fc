/** The routing a compiled model carries in its metadata, for `modc inspect` and tools. */
import type { Model } from './ir/model.js';

/** What a compiled model records about its routing, in metadata_props under `modc.routing`. */
export interface RoutingMetadata {
  mode: 'threshold' | 'topk';
  gated: boolean;
  layers: { layer: number; threshold: number; capacity: number }[];
  /** Layers that had routers but could not be routed, and why (absent when none). */
  skipped?: { layer: number; reason: string }[];
}

export const ROUTING_METADATA_KEY = 'modc.routing';

export function readRoutingMetadata(model: Model): RoutingMetadata | null {
  const entry = model.metadataProps.find((p) => p.key === ROUTING_METADATA_KEY);
  return entry?.value ? (JSON.parse(entry.value) as RoutingMetadata) : null;
}

export function writeRoutingMetadata(model: Model, meta: RoutingMetadata): void {
  model.metadataProps = [...model.metadataProps.filter((p) => p.key !== ROUTING_METADATA_KEY), { key: ROUTING_METADATA_KEY, value: JSON.stringify(meta) }];
}
