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
import type { DecoderStructure } from '../analysis/types.js';
import { ModcError } from '../core/errors.js';
import type { Value } from '../core/ir/graph.js';
import type { Model } from '../core/ir/model.js';
import { readRoutingMetadata, writeRoutingMetadata } from '../metadata/routing-metadata.js';
import type { RoutedPart } from '../routing/router-weights.js';
import { describeLayerPart } from '../routing/routing-plan.js';
import { type LayerRouting, routingOf } from './mod-common.js';
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
  model.graph.toposort();
  if (meta) {
    writeRoutingMetadata(model, {
      ...meta,
      gated: opts.gated,
      layers: meta.layers.filter((l) => report.routed.some((r) => r.layer === l.layer && r.part === l.part)),
      ...(report.skipped.length ? { skipped: report.skipped } : {}),
    });
  }
  return report;
}

/** The region and routing of every part the metadata names; a part that cannot be routed is reported and its router removed. */
function routablePlans(model: Model, s: DecoderStructure, report: RouteReport): [RoutedRegion, LayerRouting][] {
  const plans: [RoutedRegion, LayerRouting][] = [];
  for (const entry of readRoutingMetadata(model)?.layers ?? []) {
    const selected = entry.selected ? model.graph.findValue(entry.selected) : undefined;
    const routing = selected ? routingOf(selected) : null;
    const layer = s.layers[entry.layer];
    if (!routing || !layer)
      throw new ModcError(
        `route-layers: the routing metadata names ${entry.selected ? `selection ${entry.selected}` : 'no selection value'} for layer ${describeLayerPart(entry)}, which the graph does not compute (run insert-routers first)`,
      );
    const region = regionOf(model, layer, entry.part);
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
