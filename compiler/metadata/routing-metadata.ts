/** The routing a compiled model carries in its metadata, for `modc inspect` and tools. */
import { ModcError } from '../core/errors.js';
import type { Model } from '../core/ir/model.js';
import { kvPolicyProblem, type KvPolicy, type RoutedPart } from '../routing/router-weights.js';

/** One routed part of a layer in a compiled model. */
export interface RoutedLayerMetadata {
  layer: number;
  /** 'block' (the whole layer), 'attention', 'mlp' or 'kv'; models compiled before sub-layer routing read as 'block'. */
  part: RoutedPart;
  /**
   * The graph value (main graph, outside any If) holding this part's selection, bool [B, S]:
   * true = the token runs this part (for a kv part: the router keeps it as a key/value for good);
   * padding is false. Empty for models compiled before it was recorded.
   */
  selected: string;
  threshold: number;
  capacity: number;
  /** An MLP part routed with a surrogate: what an unselected token gets instead of no update. */
  surrogate?: SurrogateMetadata;
}

/**
 * A surrogate in a compiled model (SPEC.md, "MLP routed with a surrogate"): its rank, its
 * multiply-accumulates per token it runs on (2 H rank), and two main-graph values: `input`, the
 * MLP's normalised input u [B, S, H] on every token, and `output`, the surrogate's update
 * [B, S, H] (s(u) at the tokens it ran on, 0 elsewhere).
 */
export interface SurrogateMetadata {
  rank: number;
  macs: number;
  input: string;
  output: string;
}

/** An MLP part replaced by its surrogate on every token (capacity 0): no router, no selection. */
export interface ReplacedMetadata {
  layer: number;
  part: 'mlp';
  surrogate: SurrogateMetadata;
}

/** What a compiled model records about its routing, in metadata_props under `modc.routing`. */
export interface RoutingMetadata {
  mode: 'threshold' | 'topk';
  gated: boolean;
  layers: RoutedLayerMetadata[];
  /** MLP parts replaced by their surrogate on every token (absent when none). */
  replaced?: ReplacedMetadata[];
  /** Layers that had routers but could not be routed, and why (absent when none). */
  skipped?: { layer: number; part?: RoutedPart; reason: string }[];
  /** The sinks and window of the kv parts (present when the model routes a KV cache). */
  kv?: KvPolicy;
}

export const ROUTING_METADATA_KEY = 'modc.routing';

export function readRoutingMetadata(model: Model): RoutingMetadata | null {
  const entry = model.metadataProps.find((p) => p.key === ROUTING_METADATA_KEY);
  if (!entry?.value) return null;
  let meta: unknown;
  try {
    meta = JSON.parse(entry.value);
  } catch (e) {
    throw new ModcError(`metadata ${ROUTING_METADATA_KEY} is not valid JSON (${(e as Error).message})`);
  }
  const problem = routingMetadataProblem(meta);
  if (problem) throw new ModcError(`metadata ${ROUTING_METADATA_KEY} is malformed: ${problem}`);
  const parsed = meta as RoutingMetadata;
  parsed.layers = parsed.layers.map((l) => ({ ...l, part: l.part ?? 'block', selected: l.selected ?? '' }));
  return parsed;
}

function isSurrogate(x: unknown): boolean {
  if (typeof x !== 'object' || x === null) return false;
  const s = x as Record<string, unknown>;
  return Number.isSafeInteger(s.rank) && (s.rank as number) >= 1 && typeof s.macs === 'number' && typeof s.input === 'string' && typeof s.output === 'string';
}

/** What is wrong with a parsed `modc.routing` value, or null when it has the documented shape. */
function routingMetadataProblem(m: unknown): string | null {
  const isObj = (x: unknown): x is Record<string, unknown> => typeof x === 'object' && x !== null && !Array.isArray(x);
  const isLayer = (x: unknown) => Number.isSafeInteger(x) && (x as number) >= 0;
  if (!isObj(m)) return 'not a JSON object';
  if (m.mode !== 'threshold' && m.mode !== 'topk') return 'mode must be "threshold" or "topk"';
  if (typeof m.gated !== 'boolean') return 'gated must be true or false';
  if (!Array.isArray(m.layers)) return 'layers must be a list';
  for (const l of m.layers) {
    if (!isObj(l) || !isLayer(l.layer) || typeof l.threshold !== 'number' || typeof l.capacity !== 'number')
      return 'each layer needs a layer index, a threshold and a capacity';
    if (l.part !== undefined && l.part !== 'block' && l.part !== 'attention' && l.part !== 'mlp' && l.part !== 'kv')
      return 'a layer part must be "block", "attention", "mlp" or "kv"';
    if (l.selected !== undefined && typeof l.selected !== 'string') return "a layer's selected must be a value name";
    if (l.surrogate !== undefined && !isSurrogate(l.surrogate)) return "a layer's surrogate must be { rank, macs, input, output }";
  }
  if (m.replaced !== undefined) {
    if (!Array.isArray(m.replaced) || m.replaced.some((r) => !isObj(r) || !isLayer(r.layer) || r.part !== 'mlp' || !isSurrogate(r.surrogate)))
      return "replaced must be a list of { layer, part: 'mlp', surrogate: { rank, macs, input, output } }";
  }
  if (m.kv !== undefined) {
    if (!isObj(m.kv) || m.kv.sinks === undefined || m.kv.window === undefined) return 'kv must be { sinks, window }';
    const problem = kvPolicyProblem(m.kv);
    if (problem) return `kv.${problem}`;
  }
  if (m.skipped !== undefined) {
    if (!Array.isArray(m.skipped) || m.skipped.some((s) => !isObj(s) || !isLayer(s.layer) || typeof s.reason !== 'string'))
      return 'skipped must be a list of { layer, reason }';
  }
  return null;
}

export function writeRoutingMetadata(model: Model, meta: RoutingMetadata): void {
  model.metadataProps = [...model.metadataProps.filter((p) => p.key !== ROUTING_METADATA_KEY), { key: ROUTING_METADATA_KEY, value: JSON.stringify(meta) }];
}
