/**
 * route-layers: makes each routed layer (or sub-layer part) process only its selected tokens
 * (SPEC.md, "One converted layer", "Sub-layer routing"; docs/routing.md, "How a layer is routed").
 * For every part the routing metadata names, in layer order:
 *
 * - routed-region.ts finds the nodes to rewrite (a whole layer, or its attention or MLP part) and
 *   the values they read, or why the part stays dense;
 * - routed-layer.ts puts them in one If on "any row selected a token", reading the selected tokens
 *   and scattering their output back;
 * - layer-cache.ts gives a part holding the attention its own KV cache of its selected tokens
 *   (`past_valid.l` / `present_valid.l`, or `past_lengths.l` / `present_lengths.l`, docs/interface.md).
 *
 * Routing layer l replaces its output downstream, so layer l + 1 reads layer l's scatter. The
 * layer's exit must be a plain residual add: run split-fused-boundaries first.
 */
import { analyzeDecoder } from '../analysis/analyze.js';
import { GraphFacts } from '../analysis/graph-facts.js';
import { coreNodes } from '../analysis/layers.js';
import { tokenCouplingBlocker } from '../analysis/token-coupling.js';
import type { DecoderStructure, LayerInfo } from '../analysis/types.js';
import { ModcError } from '../core/errors.js';
import type { Graph, Node, Value } from '../core/ir/graph.js';
import type { Model } from '../core/ir/model.js';
import { readRoutingMetadata, writeRoutingMetadata } from '../metadata/routing-metadata.js';
import type { RoutedPart } from '../routing/router-weights.js';
import { describeLayerPart } from '../routing/routing-plan.js';
import { type LayerRouting, routingOf } from './mod-common.js';
import { MODC_DOMAIN } from './modc-ops/index.js';
import type { Pass } from './pass-manager.js';
import { routeRegion, type RouteOptions } from './routed-layer.js';
import { regionOf, type RoutedRegion } from './routed-region.js';

export type { RouteOptions } from './routed-layer.js';

export interface RouteReport {
  routed: { layer: number; part: RoutedPart }[];
  /** `part` absent for a whole block. */
  skipped: { layer: number; part?: RoutedPart; reason: string }[];
}

export function routeLayers(model: Model, opts: RouteOptions, s: DecoderStructure = analyzeDecoder(model)): RouteReport {
  const meta = readRoutingMetadata(model);
  const report: RouteReport = { routed: [], skipped: [] };
  const plans = routablePlans(model, s, report);
  const carried = new Map<Value, Value>();
  const original = new Map(model.graph.nodes.map((n, i) => [n, i]));
  for (const [region, routing] of plans) {
    const out = routeRegion(model, s, region, routing, opts, carried.get(region.input) ?? region.input, original);
    if (region.output.kind === 'stream') carried.set(region.output.value, out);
    report.routed.push({ layer: region.layer.index, part: region.part });
  }
  sinkTokenGrid(model.graph);
  model.graph.toposort();
  if (meta) {
    writeRoutingMetadata(model, {
      ...meta,
      gated: opts.gated,
      layers: meta.layers.filter((l) => l.part === 'kv' || report.routed.some((r) => r.layer === l.layer && r.part === l.part)),
      ...(report.skipped.length || meta.skipped ? { skipped: [...(meta.skipped ?? []), ...report.skipped] } : {}),
    });
  }
  return report;
}

/**
 * The token grid (modc.TokenGrid, built once for every router) feeds only the compactions. When
 * each of them sits in a branch (the compacting branches of the one-token path, one-token-path.ts),
 * every branch reading the grid gets its own copy and the main graph none: a one-token call, which
 * takes no compacting branch, then does not compute it.
 */
function sinkTokenGrid(g: Graph): void {
  for (const grid of g.nodes.filter((n) => n.opType === 'TokenGrid' && n.domain === MODC_DOMAIN)) {
    const readers = grid.outputs.flatMap((v) => [...v.uses].map((u) => u.node));
    if (readers.length === 0 || readers.some((n) => n.graph === g || !n.graph)) continue;
    const byGraph = new Map<Graph, Set<Node>>();
    for (const n of readers) byGraph.set(n.graph!, (byGraph.get(n.graph!) ?? new Set()).add(n));
    for (const [branch, inBranch] of byGraph) {
      const mapping = new Map<Value, Value>();
      branch.cloneNodes([grid], mapping, { before: branch.nodes.find((n) => inBranch.has(n)), suffix: '' });
      for (const n of inBranch)
        n.inputs.forEach((v, i) => {
          const copy = v && mapping.get(v);
          if (copy) n.setInput(i, copy);
        });
    }
    g.removeNode(grid);
  }
}

/** lastTokenCoupling per analysed decoder, for routeBlocker (asked once per MLP part). */
const couplingOf = new WeakMap<DecoderStructure, { layer: number; reason: string } | null>();

/**
 * Why route-layers would leave this layer part dense, or null when it can route it (with `s`, the
 * analysed decoder, a layer up to the last one that couples tokens is dense too, as routablePlans has it).
 */
export function routeBlocker(model: Model, layer: LayerInfo, part: RoutedPart, s?: DecoderStructure): string | null {
  let graphFacts: GraphFacts | undefined;
  const facts = () => (graphFacts ??= new GraphFacts(model.graph));
  if (s && !couplingOf.has(s)) couplingOf.set(s, lastTokenCoupling(s, facts()));
  const coupling = s ? couplingOf.get(s) : null;
  if (coupling && layer.index <= coupling.layer) return coupling.reason;
  const r = regionOf(model, layer, part, facts);
  return 'reason' in r ? r.reason : null;
}

/**
 * The last layer (or the suffix, index L) holding a node that couples tokens (a reduction over
 * the token or batch axis, dynamic quantization: compiler/analysis/token-coupling.ts), with the
 * reason every layer up to it must stay dense. A routed layer leaves the tokens it skips
 * unchanged, padding included, where the original processed them; a later node taking a
 * statistic over the tokens would read those values, so even every-token routing would not
 * reproduce the original.
 */
function lastTokenCoupling(s: DecoderStructure, facts: GraphFacts): { layer: number; reason: string } | null {
  const last = s.layers.at(-1);
  const end = s.final.residual ?? last?.exitBoundary?.normed;
  const suffix = end ? tokenCouplingBlocker(s.suffixNodes, { inputs: [end], facts, exempt: [], paddingMask: s.mask.inputs }) : null;
  if (suffix)
    return { layer: s.layers.length, reason: `the model couples tokens after its last layer: ${suffix}; routing any layer would change what that node reads` };
  for (const l of [...s.layers].reverse()) {
    const inputs = [l.residualIn, ...(l.entryBoundary ? [l.entryBoundary.normed] : [])];
    const why = tokenCouplingBlocker(l.nodes, { inputs, facts, exempt: coreNodes(l.attention) });
    if (why) return { layer: l.index, reason: `layer ${l.index} couples tokens: ${why}; routing it or a layer before it would change what that node reads` };
  }
  return null;
}

/** The region and routing of every part the metadata names; a part that cannot be routed is reported and its router removed. */
function routablePlans(model: Model, s: DecoderStructure, report: RouteReport): [RoutedRegion, LayerRouting][] {
  const plans: [RoutedRegion, LayerRouting][] = [];
  let graphFacts: GraphFacts | undefined;
  const facts = () => (graphFacts ??= new GraphFacts(model.graph));
  let coupling: { layer: number; reason: string } | undefined;
  for (const entry of readRoutingMetadata(model)?.layers ?? []) {
    // Key/value routing is the route-kv pass's (compiler/passes/route-kv.ts).
    if (entry.part === 'kv') continue;
    const selected = entry.selected ? model.graph.findValue(entry.selected) : undefined;
    const routing = selected ? routingOf(selected) : null;
    const layer = s.layers[entry.layer];
    if (!routing || !layer)
      throw new ModcError(
        `route-layers: the routing metadata names ${entry.selected ? `selection ${entry.selected}` : 'no selection value'} for layer ${describeLayerPart(entry)}, which the graph does not compute (run insert-routers first)`,
      );
    // Every layer up to the last that couples tokens stays dense.
    coupling ??= lastTokenCoupling(s, facts()) ?? { layer: -1, reason: '' };
    const region: RoutedRegion | { reason: string } = entry.layer > coupling.layer ? regionOf(model, layer, entry.part, facts) : { reason: coupling.reason };
    if ('reason' in region) {
      report.skipped.push({ layer: entry.layer, ...(entry.part !== 'block' ? { part: entry.part } : {}), reason: region.reason });
      for (const n of routing.nodes.reverse()) model.graph.removeNode(n, true);
      continue;
    }
    plans.push([region, routing]);
  }
  return plans;
}

export function routeLayersPass(opts: RouteOptions): Pass {
  return {
    name: 'route-layers',
    description: 'run each routed layer on its selected tokens only, with a compacted KV cache',
    run(model, _options, ctx) {
      const r = routeLayers(model, opts, ctx.structure());
      if (r.routed.length === 0 && r.skipped.length === 0) throw new ModcError('no routers found: run insert-routers first');
      return {
        changed: r.routed.length > 0,
        notes: [
          ...(r.routed.length ? [`routed layers ${r.routed.map(describeLayerPart).join(', ')} (${opts.gated ? 'gated' : 'ungated'})`] : []),
          ...r.skipped.map((sk) => `layer ${describeLayerPart({ layer: sk.layer, part: sk.part ?? 'block' })} not converted: ${sk.reason}`),
        ],
      };
    },
  };
}
