/**
 * Every pass modc knows, by name (what `--passes` resolves against), and the default MoD
 * pipeline: record-costs -> dense-past-length -> split-fused-boundaries -> insert-routers -> [surrogates ->]
 * [route-kv ->] [route-layers ->] cleanup [-> inline-modc-ops]: surrogates when the plan gives an MLP
 * part a surrogate, route-kv when it routes a KV cache (kv parts), route-layers when it routes blocks,
 * attention or MLPs.
 */
import { UsageError } from '../core/errors.js';
import { PassRegistry, stepOf, type Pass, type PipelineStep } from './pass-manager.js';
import type { RoutingPlan } from '../routing/routing-plan.js';
import { cleanupPass } from './cleanup.js';
import { densePastLengthPass } from './dense-past-length.js';
import { inlineModcOpsPass } from './inline-modc-ops.js';
import { insertRoutersPass } from './insert-routers.js';
import { lastLogitsPass } from './last-logits.js';
import { liftConstantsPass } from './lift-constants.js';
import { recordCostsPass } from './record-costs.js';
import { routeKvPass } from './route-kv.js';
import { routeLayersPass } from './route-layers.js';
import { splitFusedBoundariesPass } from './split-fused-boundaries.js';
import { planHasSurrogates, replacedLayers, surrogatesPass } from './surrogates.js';

/** What the MoD passes need beyond their own options: the resolved routing plan. */
export interface ModOptions {
  plan: RoutingPlan;
  inlineOps?: boolean;
  /** 'last': add last-logits (the lm_head for each row's last real position only). Default 'all'. */
  logits?: 'all' | 'last';
}

function needsPlan(name: string, description: string): Pass {
  return {
    name,
    description,
    run() {
      throw new UsageError(`pass ${name} needs routers: give --routers FILE or --router-init all-pass|random`);
    },
  };
}

export function defaultRegistry(mod?: ModOptions): PassRegistry {
  const reg = new PassRegistry()
    .register(cleanupPass)
    .register(liftConstantsPass)
    .register(splitFusedBoundariesPass)
    .register(inlineModcOpsPass)
    .register(recordCostsPass)
    .register(densePastLengthPass)
    .register(lastLogitsPass);
  if (mod)
    return reg
      .register(insertRoutersPass(mod.plan))
      .register(surrogatesPass(mod.plan))
      .register(routeKvPass)
      .register(routeLayersPass({ gated: mod.plan.gated }));
  return reg
    .register(needsPlan('insert-routers', "add a router and token selection on each converted layer's residual input"))
    .register(needsPlan('surrogates', 'give each MLP part with a surrogate its s(u) on the tokens it skips (or on every token when it has no router)'))
    .register(needsPlan('route-kv', routeKvPass.description))
    .register(needsPlan('route-layers', 'run each routed layer on its selected tokens only, with a compacted KV cache'));
}

/** The default `modc compile` pipeline for a routing plan. */
export function modPipeline(mod: ModOptions): PipelineStep[] {
  const replaced = replacedLayers(mod.plan);
  const layers = [...new Set([...mod.plan.layers.map((l) => l.layer), ...replaced])].join(',');
  // Sub-layer parts need the stream between attention and MLP as a value: split fusions there too.
  const within = [...new Set([...mod.plan.layers.filter((l) => l.part === 'attention' || l.part === 'mlp').map((l) => l.layer), ...replaced])].join(',');
  // A plan that only replaces MLPs by their surrogates has no router to insert or route.
  const routed = mod.plan.layers.length > 0;
  return [
    stepOf(recordCostsPass, {}),
    stepOf(densePastLengthPass, {}),
    stepOf(splitFusedBoundariesPass, { layers, within }),
    ...(routed ? [stepOf(insertRoutersPass(mod.plan), {})] : []),
    ...(planHasSurrogates(mod.plan) ? [stepOf(surrogatesPass(mod.plan), {})] : []),
    ...(mod.plan.layers.some((l) => l.part === 'kv') ? [stepOf(routeKvPass, {})] : []),
    ...(mod.plan.layers.some((l) => l.part !== 'kv') ? [stepOf(routeLayersPass({ gated: mod.plan.gated }), {})] : []),
    ...(mod.logits === 'last' ? [stepOf(lastLogitsPass, {})] : []),
    stepOf(cleanupPass, {}),
    ...(mod.inlineOps ? [stepOf(inlineModcOpsPass, {})] : []),
  ];
}

export {
  cleanupPass,
  densePastLengthPass,
  inlineModcOpsPass,
  insertRoutersPass,
  lastLogitsPass,
  liftConstantsPass,
  recordCostsPass,
  routeKvPass,
  routeLayersPass,
  splitFusedBoundariesPass,
  surrogatesPass,
};
