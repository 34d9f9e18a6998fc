/**
 * Compute accounting for allocation, on top of the project's cost model (analysis/cost.ts, the
 * one definition of the compute fraction): what a routed part saves when it keeps a fraction c of
 * each row's tokens (a kept query then sees the kept earlier keys: k(k+1)/2 pairs, k = c n).
 */
import { denseUsage, executedMacs, type ModelCosts, type RowUsage } from '../../analysis/cost.js';
import type { RoutedPart } from './parts.js';

export type { ModelCosts };

/** The dense model's MACs on rows of these lengths. */
export function denseMacs(costs: ModelCosts, lengths: readonly number[]): number {
  return lengths.reduce((a, n) => a + executedMacs(costs, denseUsage(costs, n)), 0);
}

/**
 * MACs a part saves on rows of these lengths when it runs on a fraction c of each row, net of its
 * router and, for an MLP part with a surrogate of `surrogateMacs` MACs per token, net of the
 * surrogate on the tokens the MLP skips. An MLP part with a surrogate at capacity 0 has no router.
 */
export function savedMacs(costs: ModelCosts, layer: number, part: RoutedPart, c: number, lengths: readonly number[], surrogateMacs = 0): number {
  let saved = 0;
  for (const n of lengths) {
    const dense = denseUsage(costs, n);
    const routed: RowUsage = { tokens: n, layers: dense.layers.map((u) => ({ ...u })) };
    const u = routed.layers[layer]!;
    const k = c * n;
    if (part !== 'mlp') u.attention = k;
    if (part !== 'attention') u.mlp = k;
    u.routers = surrogateMacs > 0 && c <= 0 ? 0 : 1;
    if (surrogateMacs > 0) u.surrogateMacs = surrogateMacs * (n - k);
    saved += executedMacs(costs, dense) - executedMacs(costs, routed);
  }
  return saved;
}
