/**
 * The figures people look at, drawn from the JSON the tools print (data first, plots second):
 * speedup and KV bytes vs capacity (from `modc bench --json` reports) and quality vs compute
 * (from `modc eval --json` results or the quality bench's rows). Each figure is a Vega-Lite
 * spec, rendered to SVG by Vega's headless renderer (no browser, no canvas).
 */
import * as vega from 'vega';
import * as vl from 'vega-lite';
import type { TopLevelSpec } from 'vega-lite';
import type { BenchReport } from '../benchmark/benchmark.js';
import { ModcError } from '../../core/errors.js';

/** One compiled model against its original, at one capacity. */
export interface CapacityPoint {
  /** Top-k capacity, or for threshold routing the kept fraction measured in the routed layers' caches. */
  capacity: number;
  label: string;
  /** original / compiled: > 1 is faster. */
  prefillSpeedup: number;
  decodeSpeedup: number;
  /** compiled / original KV bytes. */
  kvRatio: number;
}

/** One model's quality and the compute it spent. */
export interface QualityPoint {
  /** The series the point belongs to (method, router kind, ...). */
  series: string;
  computeFraction: number;
  nll: number;
}

const WIDTH = 320;
const HEIGHT = 220;

export function capacityFigure(points: readonly CapacityPoint[], title = 'Mixture-of-Depths: speed and KV cache vs capacity'): TopLevelSpec {
  if (points.length === 0) throw new ModcError('nothing to plot: no bench points');
  const speed = points.flatMap((p) => [
    { capacity: p.capacity, speedup: p.prefillSpeedup, series: 'prefill', model: p.label },
    { capacity: p.capacity, speedup: p.decodeSpeedup, series: 'decode', model: p.label },
  ]);
  const kv = points.map((p) => ({ capacity: p.capacity, kv: p.kvRatio, series: 'KV bytes', model: p.label }));
  const x = { field: 'capacity', type: 'quantitative', title: 'capacity (fraction of tokens a routed layer runs)', scale: { domain: [0, 1] } } as const;
  return {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    title,
    hconcat: [
      {
        title: 'speedup (original time / compiled time)',
        width: WIDTH,
        height: HEIGHT,
        data: { values: speed },
        layer: [
          { mark: { type: 'rule', strokeDash: [4, 4], color: 'gray' }, encoding: { y: { datum: 1 } } },
          {
            mark: { type: 'line', point: true },
            encoding: {
              x,
              y: { field: 'speedup', type: 'quantitative', title: 'speedup', scale: { zero: false } },
              color: { field: 'series', type: 'nominal', title: null },
              order: { field: 'capacity' },
              tooltip: [{ field: 'model' }],
            },
          },
        ],
      },
      {
        title: 'KV cache bytes (compiled / original)',
        width: WIDTH,
        height: HEIGHT,
        data: { values: kv },
        mark: { type: 'line', point: true },
        encoding: {
          x,
          y: { field: 'kv', type: 'quantitative', title: 'KV bytes ratio', scale: { domain: [0, 1.1] } },
          color: { field: 'series', type: 'nominal', title: null },
          order: { field: 'capacity' },
          tooltip: [{ field: 'model' }],
        },
      },
    ],
    resolve: { scale: { color: 'independent' } },
  } as TopLevelSpec;
}

export function qualityFigure(points: readonly QualityPoint[], title = 'Quality vs compute'): TopLevelSpec {
  if (points.length === 0) throw new ModcError('nothing to plot: no quality points');
  return {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    title,
    width: WIDTH * 1.5,
    height: HEIGHT * 1.3,
    data: { values: points.map((p) => ({ ...p })) },
    mark: { type: 'line', point: true },
    encoding: {
      x: { field: 'computeFraction', type: 'quantitative', title: 'compute (fraction of dense MACs)', scale: { zero: false } },
      y: { field: 'nll', type: 'quantitative', title: 'held-out NLL (nats/token)', scale: { zero: false } },
      color: { field: 'series', type: 'nominal', title: null },
      order: { field: 'computeFraction' },
    },
  } as TopLevelSpec;
}

/** A Vega-Lite spec as an SVG document. */
export async function renderSvg(spec: TopLevelSpec): Promise<string> {
  const view = new vega.View(vega.parse(vl.compile(spec).spec), { renderer: 'none' });
  try {
    return await view.toSVG();
  } finally {
    view.finalize();
  }
}

/**
 * Points from `modc bench` reports: models[0] is the original (capacity 1, speedup 1, KV 1 is
 * added once), each ratio one compiled model at `capacityOf(model path)`.
 */
export function benchPoints(reports: readonly BenchReport[], capacityOf: (model: string, report: BenchReport, index: number) => number): CapacityPoint[] {
  const points: CapacityPoint[] = [];
  for (const r of reports) {
    r.ratios.forEach((ratio, i) =>
      points.push({
        capacity: capacityOf(ratio.model, r, i + 1),
        label: ratio.model,
        prefillSpeedup: 1 / ratio.prefill.medianOfPaired,
        decodeSpeedup: r.settings.steps > 0 ? 1 / ratio.decode.medianOfPaired : NaN,
        kvRatio: ratio.kvBytes,
      }),
    );
  }
  const original = reports[0]?.models[0]?.model ?? 'original';
  return [{ capacity: 1, label: original, prefillSpeedup: 1, decodeSpeedup: 1, kvRatio: 1 }, ...points].filter((p) => Number.isFinite(p.prefillSpeedup));
}

/**
 * The fraction of tokens a compiled model's routed layers kept: their cache lengths over the
 * original's after the bench's last run. `kvLayers[i]` is the layer of cacheLengths[i]; `routed`
 * the routed layers (attention or block) of the compiled model.
 */
export function keptFraction(report: BenchReport, index: number, kvLayers: readonly number[], routed: readonly number[]): number {
  const base = report.models[0]!.cacheLengths;
  const own = report.models[index]!.cacheLengths;
  const fractions: number[] = [];
  own.forEach((rows, i) => {
    if (!routed.includes(kvLayers[i]!)) return;
    rows.forEach((n, b) => {
      const full = base[i]?.[b] ?? 0;
      if (full > 0) fractions.push(n / full);
    });
  });
  return fractions.length ? fractions.reduce((a, v) => a + v, 0) / fractions.length : 1;
}
