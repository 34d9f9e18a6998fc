/**
 * The calibrated router file: the shared safetensors writer (compiler/routing/router-weights.ts: `router.{l}.*`
 * for a whole block, `router.{l}.attn.*`, `router.{l}.mlp.*`), each router with its threshold,
 * and under `__metadata__.modc` the mode, gating, per-part capacities and thresholds, and the
 * calibration report and recipe, so `modc compile --routers FILE` needs no other flag.
 */
import { renameSync, rmSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { type RouterFileMetadata, surrogateMacs, writeRouterFile } from '../../routing/router-weights.js';
import type { CalibrationResult } from './calibrate.js';

/** The calibration data as recorded: its path, lines, sha256, and the sequences and tokens calibration used. */
export interface CalibrationData {
  path: string;
  tokens: number;
  sequences: number;
  lines?: number;
  sha256?: string;
}

export function routerFileMetadata(result: CalibrationResult, data: CalibrationData): RouterFileMetadata {
  const sur = (s: { rank: number; bias: Float32Array }) => ({ rank: s.rank, macs: surrogateMacs(s, s.bias.length) });
  return {
    mode: result.mode,
    gated: result.gated,
    layers: [
      ...result.routers.map((r) => ({
        layer: r.layer,
        part: r.part,
        capacity: r.capacity,
        threshold: r.threshold,
        ...(r.surrogate ? { surrogate: sur(r.surrogate) } : {}),
      })),
      ...(result.replaced ?? []).map((r) => ({ layer: r.layer, part: r.part, capacity: 0, surrogate: sur(r.surrogate) })),
    ].sort((a, b) => a.layer - b.layer),
    calibration: { tool: 'modc calibrate', data, recipe: result.recipe, report: result.report },
  };
}

/** Writes the routers and metadata atomically: a temp file in the same folder, then a rename. */
export function writeCalibratedRouters(path: string, result: CalibrationResult, metadata: RouterFileMetadata): void {
  const tmp = join(dirname(path), `.${basename(path)}.tmp-${process.pid}`);
  try {
    writeRouterFile(
      tmp,
      result.routers.map((r) => ({
        layer: r.layer,
        part: r.part,
        weight: r.weight,
        bias: r.bias,
        threshold: r.threshold,
        ...(r.surrogate ? { surrogate: r.surrogate } : {}),
      })),
      metadata,
      { replaced: result.replaced ?? [] },
    );
    renameSync(tmp, path);
  } catch (e) {
    rmSync(tmp, { force: true });
    throw e;
  }
}
