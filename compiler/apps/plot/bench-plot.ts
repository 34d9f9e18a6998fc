/** `modc bench --plot`: a bench report of one original and compiled models, drawn against capacity. */
import type { BenchReport } from '../benchmark/benchmark.js';
import { writeTextAtomic } from '../../core/io/write-text.js';
import { loadModel } from '../../core/io/load.js';
import { readRoutingMetadata } from '../../metadata/routing-metadata.js';
import { decoderIo } from '../../metadata/decoder-io.js';
import { benchPoints, capacityFigure, keptFraction, renderSvg } from './figures.js';

/**
 * A compiled model's capacity: the mean top-k capacity of its routed attention/block parts; for
 * threshold routing (no fixed capacity) the kept fraction measured in their caches.
 */
export function modelCapacity(report: BenchReport, index: number, path: string): number {
  const model = loadModel(path);
  const routing = readRoutingMetadata(model);
  const parts = routing?.layers.filter((l) => l.part !== 'mlp') ?? [];
  if (!routing || parts.length === 0) return 1;
  if (routing.mode === 'topk') return parts.reduce((a, l) => a + l.capacity, 0) / parts.length;
  return keptFraction(
    report,
    index,
    decoderIo(model).kv.map((b) => b.layer),
    parts.map((l) => l.layer),
  );
}

/** Draws the report (one or more compiled models) to `out` as SVG. */
export async function benchCapacity(report: BenchReport, out: string): Promise<void> {
  const points = benchPoints([report], (model, r, i) => modelCapacity(r, i, model));
  writeTextAtomic(out, await renderSvg(capacityFigure(points)));
}
