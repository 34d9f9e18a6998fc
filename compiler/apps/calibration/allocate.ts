/**
 * Which parts to route, at which capacity: greedy by loss per compute saved. Each part has a
 * measured loss curve (NLL increase when only that part is routed, at a few capacities, 0 at
 * capacity 1). Starting dense, the cheapest step (smallest loss increase per MAC saved) is taken
 * until the compute fraction reaches the target; the last step is interpolated so the target is
 * met without overshooting. A whole-block router excludes sub-layer routers on the same layer,
 * and variants of one part (an MLP part with surrogates of different ranks) exclude each other.
 */
import { denseMacs, type ModelCosts, savedMacs } from './compute.js';
import { partKey, type PartRef } from './parts.js';

export interface PartSensitivity extends PartRef {
  /** An MLP part with a surrogate: its rank (one variant of the part) and MACs per token it runs on. */
  rank?: number;
  surrogateMacs?: number;
  /** Measured (capacity, NLL increase per token) points, any order; capacity 1 costs 0. */
  points: { capacity: number; deltaNll: number }[];
}

export interface Allocation {
  parts: (PartRef & { rank?: number; surrogateMacs?: number; capacity: number; predictedDeltaNll: number })[];
  /** The cost model's compute fraction for these capacities on the calibration lengths. */
  predictedCompute: number;
  /** Sum of the parts' measured NLL increases (an additive estimate). */
  predictedDeltaNll: number;
}

function curve(s: PartSensitivity): { capacity: number; deltaNll: number }[] {
  return [{ capacity: 1, deltaNll: 0 }, ...[...s.points].sort((a, b) => b.capacity - a.capacity)];
}

function lerp(a: { capacity: number; deltaNll: number }, b: { capacity: number; deltaNll: number }, c: number): number {
  if (a.capacity === b.capacity) return b.deltaNll;
  return a.deltaNll + ((a.capacity - c) / (a.capacity - b.capacity)) * (b.deltaNll - a.deltaNll);
}

export function allocate(sens: readonly PartSensitivity[], cost: ModelCosts, lengths: readonly number[], target: number): Allocation {
  const dense = denseMacs(cost, lengths);
  const curves = sens.map(curve);
  const level = sens.map(() => 0);
  const capacity = sens.map(() => 1);
  const saved = (i: number, c: number) => savedMacs(cost, sens[i]!.layer, sens[i]!.part, c, lengths, sens[i]!.surrogateMacs ?? 0);
  const computeOf = () => 1 - capacity.reduce((a, c, i) => a + (c < 1 ? saved(i, c) : 0), 0) / dense;
  const blocked = (i: number) => {
    const s = sens[i]!;
    return sens.some((o, j) => j !== i && o.layer === s.layer && capacity[j]! < 1 && ((o.part === 'block') !== (s.part === 'block') || o.part === s.part));
  };
  let compute = computeOf();
  while (compute > target) {
    let best = -1;
    let bestRatio = Infinity;
    for (let i = 0; i < sens.length; i++) {
      const c = curves[i]!;
      if (level[i]! + 1 >= c.length || blocked(i)) continue;
      const from = c[level[i]!]!;
      const to = c[level[i]! + 1]!;
      const gain = saved(i, to.capacity) - (from.capacity < 1 ? saved(i, from.capacity) : 0);
      if (gain <= 0) continue;
      const ratio = (to.deltaNll - from.deltaNll) / gain;
      if (ratio < bestRatio) {
        bestRatio = ratio;
        best = i;
      }
    }
    if (best < 0) break;
    const c = curves[best]!;
    const from = c[level[best]!]!;
    const to = c[level[best]! + 1]!;
    capacity[best] = to.capacity;
    level[best]! += 1;
    const after = computeOf();
    if (after < target) {
      // Interpolate this step: the capacity between `from` and `to` that lands on the target.
      let lo = to.capacity;
      let hi = from.capacity;
      for (let k = 0; k < 40; k++) {
        const mid = (lo + hi) / 2;
        capacity[best] = mid;
        if (computeOf() > target) hi = mid;
        else lo = mid;
      }
      capacity[best] = lo;
    }
    compute = computeOf();
  }
  const parts = sens.flatMap((s, i) => {
    if (capacity[i]! >= 1) return [];
    const c = curves[i]!;
    const j = c.findIndex((p) => p.capacity <= capacity[i]!);
    const delta = j <= 0 ? 0 : lerp(c[j - 1]!, c[j]!, capacity[i]!);
    const variant = s.rank !== undefined ? { rank: s.rank, surrogateMacs: s.surrogateMacs ?? 0 } : {};
    return [{ layer: s.layer, part: s.part, ...variant, capacity: capacity[i]!, predictedDeltaNll: delta }];
  });
  parts.sort((a, b) => a.layer - b.layer || partKey(a).localeCompare(partKey(b)));
  return { parts, predictedCompute: compute, predictedDeltaNll: parts.reduce((a, p) => a + p.predictedDeltaNll, 0) };
}
