/**
 * record-costs: writes the original model's cost model (compiler/analysis/cost.ts) into the
 * metadata under `modc.costs`, before any pass rewrites the layers, so `modc eval` can measure
 * a compiled model's compute fraction without re-analysing the rewritten graph; and `modc.output
 * = hidden` for a model whose output is hidden states rather than logits.
 */
import { modelCosts, readCosts, writeCosts } from '../analysis/cost.js';
import { writeOutputKind } from '../metadata/logits-metadata.js';
import type { Pass } from './pass-manager.js';

export const recordCostsPass: Pass = {
  name: 'record-costs',
  description: "record the dense model's MACs per layer and part in the metadata (modc.costs), for modc eval",
  preserves: ['structure'],
  run(model, _options, ctx) {
    // A model compiled before keeps the costs of its original: they describe the dense model.
    if (readCosts(model)) return { changed: false, notes: ['modc.costs already recorded'] };
    const costs = modelCosts(ctx.structure());
    writeCosts(model, costs);
    // Runners that need logits refuse a hidden-states output without re-analysing the compiled graph.
    if (ctx.structure().final.kind === 'hidden') writeOutputKind(model, 'hidden');
    const perToken = costs.layers.reduce((a, l) => a + l.attention + l.mlp, costs.lmHead);
    return { changed: true, notes: [`${costs.layers.length} layers, ${perToken} MACs per token (projections, MLP, lm_head) before attention pairs`] };
  },
};
