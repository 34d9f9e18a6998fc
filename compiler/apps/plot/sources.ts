/**
 * Figure points from the JSON documents modc prints: `modc bench --json` reports, `modc eval
 * --json` results, and the quality bench's `--json` rows (bench/quality.ts). Each document is
 * recognised by its shape; anything else is refused with its file name.
 */
import { basename } from 'node:path';
import type { BenchReport } from '../benchmark/benchmark.js';
import { ModcError } from '../../core/errors.js';
import { modelCapacity } from './bench-plot.js';
import { benchPoints, type CapacityPoint, type QualityPoint } from './figures.js';

export interface PlotSource {
  /** Shown in errors and used as the series name of an eval result. */
  name: string;
  doc: unknown;
}

const isObj = (x: unknown): x is Record<string, unknown> => typeof x === 'object' && x !== null && !Array.isArray(x);
const isBench = (d: unknown): d is BenchReport => isObj(d) && isObj(d.settings) && Array.isArray(d.models) && Array.isArray(d.ratios);
const isEval = (d: unknown): d is { nll: number; computeFraction: number; routing: { mode: string } | null } =>
  isObj(d) && typeof d.nll === 'number' && typeof d.computeFraction === 'number';
const isQualityBench = (d: unknown): d is { denseNll: number; rows: { method: string; granularity: string; computeFraction: number; nll: number }[] } =>
  isObj(d) && typeof d.denseNll === 'number' && Array.isArray(d.rows);

export function collectPoints(sources: readonly PlotSource[]): { capacity: CapacityPoint[]; quality: QualityPoint[] } {
  const reports: BenchReport[] = [];
  const quality: QualityPoint[] = [];
  const evals: { name: string; nll: number; computeFraction: number; dense: boolean }[] = [];
  for (const s of sources) {
    if (isBench(s.doc)) reports.push(s.doc);
    else if (isQualityBench(s.doc)) {
      quality.push({ series: 'dense', computeFraction: 1, nll: s.doc.denseNll });
      for (const r of s.doc.rows)
        if (r.granularity !== 'dense') quality.push({ series: `${r.method}, ${r.granularity}`, computeFraction: r.computeFraction, nll: r.nll });
    } else if (isEval(s.doc)) evals.push({ name: basename(s.name), nll: s.doc.nll, computeFraction: s.doc.computeFraction, dense: s.doc.routing === null });
    else throw new ModcError(`${s.name} is not a modc bench, modc eval or quality-bench JSON document`);
  }
  // modc eval results: one series through every model evaluated, sorted by compute.
  for (const e of evals) quality.push({ series: 'modc eval', computeFraction: e.computeFraction, nll: e.nll });
  const capacity = reports.length ? benchPoints(reports, (model, r, i) => modelCapacity(r, i, model)) : [];
  return { capacity, quality };
}
