/**
 * Per-token importance targets a router is fitted to predict, from one batch of captured
 * activations. For a part with input u (the stream it reads) and update d (what it adds):
 * - `norm`: ||d||, the size of the update a skipped token loses;
 * - `relative`: ||d|| / ||s||, the update relative to the stream s it is added to;
 * - `log-norm`: log ||d||, the update's size on a log scale (less dominated by outliers).
 * `relative` is the default: on fixtures/quality-lm it gave the lowest held-out NLL at every
 * granularity (docs/commands.md, "modc calibrate").
 */
import type { LayerPoints } from './capture.js';
import type { RoutedPart } from './parts.js';

export type TargetKind = 'norm' | 'relative' | 'log-norm';
export const TARGET_KINDS: readonly TargetKind[] = ['norm', 'relative', 'log-norm'];

/** Which captured values a part reads and which two values its update is the difference of. */
export function partValues(p: LayerPoints, part: RoutedPart): { input: string; from: string; to: string } | null {
  if (part === 'block') return { input: p.x, from: p.x, to: p.out };
  if (!p.h) return null;
  if (part === 'attention') return { input: p.x, from: p.x, to: p.h };
  return { input: p.parallel ? p.x : p.h, from: p.h, to: p.out };
}

/** Targets of every kind for the listed real tokens (flat indices into [B*S, H] arrays). */
export function importanceTargets(from: Float32Array, to: Float32Array, real: Int32Array, H: number): Record<TargetKind, Float64Array> {
  const norm = new Float64Array(real.length);
  const relative = new Float64Array(real.length);
  const logNorm = new Float64Array(real.length);
  real.forEach((i, k) => {
    let dd = 0;
    let uu = 0;
    const base = i * H;
    for (let h = 0; h < H; h++) {
      const d = to[base + h]! - from[base + h]!;
      dd += d * d;
      uu += from[base + h]! * from[base + h]!;
    }
    const n = Math.sqrt(dd);
    norm[k] = n;
    relative[k] = n / Math.max(Math.sqrt(uu), 1e-12);
    logNorm[k] = Math.log(Math.max(n, 1e-12));
  });
  return { norm, relative, 'log-norm': logNorm };
}
