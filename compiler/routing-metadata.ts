/** The routing a compiled model carries in its metadata, for `modc inspect` and tools. */
import type { Model } from './ir/model.js';
import type { RoutedPart } from './routers.js';

/** One routed part of a layer in a compiled model. */
export interface RoutedLayerMetadata {
  layer: number;
  /** 'block' (the whole layer), 'attention' or 'mlp'; models compiled before sub-layer routing read as 'block'. */
  part: RoutedPart;
  /**
   * The graph value (main graph, outside any If) holding this part's selection, bool [B, S]:
   * true = the token runs this part; padding is false. Empty for models compiled before it was recorded.
   */
  selected: string;
  threshold: number;
  capacity: number;
}

/** What a compiled model records about its routing, in metadata_props under `modc.routing`. */
export interface RoutingMetadata {
  mode: 'threshold' | 'topk';
  gated: boolean;
  layers: RoutedLayerMetadata[];
  /** Layers that had routers but could not be routed, and why (absent when none). */
  skipped?: { layer: number; part?: RoutedPart; reason: string }[];
}

export const ROUTING_METADATA_KEY = 'modc.routing';

export function readRoutingMetadata(model: Model): RoutingMetadata | null {
  const entry = model.metadataProps.find((p) => p.key === ROUTING_METADATA_KEY);
  if (!entry?.value) return null;
  const meta = JSON.parse(entry.value) as RoutingMetadata;
  if (Array.isArray(meta.layers)) meta.layers = meta.layers.map((l) => ({ ...l, part: l.part ?? 'block', selected: l.selected ?? '' }));
  return meta;
}

export function writeRoutingMetadata(model: Model, meta: RoutingMetadata): void {
  model.metadataProps = [...model.metadataProps.filter((p) => p.key !== ROUTING_METADATA_KEY), { key: ROUTING_METADATA_KEY, value: JSON.stringify(meta) }];
}
