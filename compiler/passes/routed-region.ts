/**
 * Which nodes a routing rewrites (route-layers): the region of a whole layer (block) or of one
 * of its parts (attention or MLP sub-layer), the values it reads and the value it hands on, or
 * why the part cannot be routed. Found on the analysed graph before anything is changed.
 */
import { kvCompactionBlocker } from '../analysis/attention.js';
import type { GraphFacts } from '../analysis/graph-facts.js';
import { coreNodes } from '../analysis/layers.js';
import { subLayersOf } from '../analysis/sub-layers.js';
import { tokenCouplingBlocker } from '../analysis/token-coupling.js';
import { isStaticLayout, type LayerInfo, type SideInput } from '../analysis/types.js';
import type { Node, Value } from '../core/ir/graph.js';
import type { Model } from '../core/ir/model.js';
import { graphInputsReached } from '../core/ir/rewrite.js';
import type { RoutedPart } from '../routing/router-weights.js';
import { MODC_DOMAIN } from './modc-ops/index.js';

/**
 * What one routing rewrites: a whole layer (its output y is scattered into the stream) or a
 * sub-layer part (its update u is scattered into zeros).
 */
export interface RoutedRegion {
  layer: LayerInfo;
  part: RoutedPart;
  /** The stream value the region reads, as analysed (before earlier layers were routed). */
  input: Value;
  nodes: Set<Node>;
  sideInputs: SideInput[];
  output: { kind: 'stream' | 'update'; value: Value };
  /** The region holds the attention core: its KV cache holds the selected tokens only. */
  compactsKv: boolean;
}

/**
 * Per-token values computed from token inputs alone (rotary cos/sin of position_ids) can be
 * recomputed from the gathered inputs, whatever their layout; others must be [batch, seq, ...].
 */
export function fromTokenInputsOnly(model: Model, v: Value): boolean {
  const sources = graphInputsReached(model.graph, [v]);
  return sources.size > 0 && [...sources].every((s) => s.name === 'position_ids' || s.name === 'input_ids');
}

/** A per-token side input laid out [batch, sequence, ...]: gathered like the stream. */
export function tokenMajor(si: SideInput): boolean {
  return si.kind === 'per-token' && si.batchAxis === 0 && si.sequenceAxis === 1;
}

/** The region of a layer part, or why it cannot be routed. */
export function regionOf(model: Model, layer: LayerInfo, part: RoutedPart, facts: () => GraphFacts): RoutedRegion | { reason: string } {
  if (part === 'kv') return { reason: 'key/value routing is the route-kv pass' };
  return part === 'block' ? blockRegion(model, layer, facts) : partRegion(model, layer, part, facts);
}

function blockRegion(model: Model, layer: LayerInfo, facts: () => GraphFacts): RoutedRegion | { reason: string } {
  const inputs = [layer.residualIn, ...(layer.entryBoundary ? [layer.entryBoundary.normed] : [])];
  const why =
    blockBlocker(layer) ??
    kvCompactionBlocker(layer.attention) ??
    sideInputBlocker(model, layer.sideInputs) ??
    callerMaskBlocker(layer, layer.sideInputs) ??
    tokenCouplingBlocker(layer.nodes, { inputs, facts: facts(), exempt: coreNodes(layer.attention) });
  if (why) return { reason: why };
  return {
    layer,
    part: 'block',
    input: layer.residualIn,
    nodes: new Set(layer.nodes.filter((n) => n.domain !== MODC_DOMAIN)),
    sideInputs: layer.sideInputs,
    output: { kind: 'stream', value: layer.residualOut! },
    compactsKv: true,
  };
}

function partRegion(model: Model, layer: LayerInfo, part: 'attention' | 'mlp', facts: () => GraphFacts): RoutedRegion | { reason: string } {
  // Like a block, no part of a layer with state besides the KV cache is routed (it stays dense).
  const stateful = layer.sideInputs.find((si) => si.kind === 'other');
  if (stateful) return { reason: `side input ${stateful.value} is not understood (${(stateful as { reason: string }).reason})` };
  const parts = subLayersOf(layer, new Set(model.graph.outputs));
  if ('reason' in parts) return { reason: `no sub-layer boundary: ${parts.reason}` };
  const sub = parts[part];
  const joinFused = sub.join.opType !== 'Add' || sub.join.domain !== '';
  const nonWeight = sub.sideInputs.find((si) => si.kind !== 'weight');
  const why =
    (joinFused
      ? `its ${part} update is added by ${sub.join.describe()}, not a plain Add (run split-fused-boundaries with within=${layer.index} first)`
      : null) ??
    sub.blocker ??
    (part === 'attention' ? kvCompactionBlocker(layer.attention) : null) ??
    sideInputBlocker(model, sub.sideInputs) ??
    callerMaskBlocker(layer, sub.sideInputs) ??
    tokenCouplingBlocker(sub.nodes, { inputs: [sub.input], facts: facts(), exempt: coreNodes(layer.attention) }) ??
    (part === 'mlp' && nonWeight ? `its MLP reads ${nonWeight.value}, which is not a weight` : null);
  if (why) return { reason: why };
  return {
    layer,
    part,
    input: sub.input,
    nodes: new Set(sub.nodes),
    sideInputs: sub.sideInputs,
    output: { kind: 'update', value: sub.update },
    compactsKv: part === 'attention',
  };
}

function blockBlocker(layer: LayerInfo): string | null {
  if (!layer.residualOut) return `its residual add is fused into ${layer.exit.node.describe()} (run split-fused-boundaries first)`;
  if (layer.exit.node.opType !== 'Add') return `its exit ${layer.exit.node.describe()} is not a plain Add (run split-fused-boundaries first)`;
  return null;
}

/**
 * A caller's 4-D mask is gathered at the sequence indices of the keys an unfused attention lays
 * out as `Concat(cache, new)` (compiler/passes/caller-mask.ts); other attention forms order their
 * keys otherwise.
 */
function callerMaskBlocker(layer: LayerInfo, sideInputs: readonly SideInput[]): string | null {
  const mask = sideInputs.find((si) => si.kind === 'attention-mask' && si.form === 'caller-4d');
  if (!mask) return null;
  const a = layer.attention;
  if (a.form !== 'unfused' || isStaticLayout(a.kv.layout))
    return `it reads the caller's 4-D attention mask ${mask.value} with ${a.form} attention (${a.kv.layout} cache); modc gathers such a mask for unfused attention with a growing cache only`;
  return null;
}

/** Side inputs a routed region cannot take: not understood, or per-token in a layout that cannot be gathered. */
function sideInputBlocker(model: Model, sideInputs: readonly SideInput[]): string | null {
  for (const si of sideInputs) {
    if (si.kind === 'other') return `side input ${si.value} is not understood (${si.reason})`;
    if (si.kind === 'per-token' && !fromTokenInputsOnly(model, si.value) && !tokenMajor(si)) {
      return `per-token side input ${si.value} has batch axis ${si.batchAxis} and sequence axis ${si.sequenceAxis}; only [batch, sequence, ...] layouts (batch axis 0) can be gathered`;
    }
  }
  return null;
}
