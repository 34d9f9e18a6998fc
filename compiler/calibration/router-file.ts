/**
 * The calibrated router file: safetensors with one router per routed part (SPEC.md names:
 * `router.{l}.*` for a whole block, `router.{l}.attn.*`, `router.{l}.mlp.*`), each with its
 * threshold, and under `__metadata__.modc` the mode, gating, per-part capacities and thresholds,
 * and the calibration statistics and recipe, so `modc compile --routers FILE` needs no other flag.
 */
import { closeSync, fsyncSync, openSync, renameSync, rmSync, writeSync } from 'node:fs';
import { dirname, basename, join } from 'node:path';
import type { CalibrationResult } from './calibrate.js';
import type { RoutedPart } from './parts.js';

/** The `modc` metadata entry of a router file (INTERFACES.md). */
export interface RouterFileMetadata {
  mode: 'threshold' | 'topk';
  gated: boolean;
  layers: { layer: number; part: RoutedPart; capacity: number; threshold: number }[];
  calibration: Record<string, unknown>;
}

export function routerTensorPrefix(layer: number, part: RoutedPart): string {
  return part === 'block' ? `router.${layer}` : `router.${layer}.${part === 'attention' ? 'attn' : 'mlp'}`;
}

export function routerFileMetadata(result: CalibrationResult, data: { path: string; tokens: number; sequences: number }): RouterFileMetadata {
  return {
    mode: result.mode,
    gated: result.gated,
    layers: result.routers.map((r) => ({ layer: r.layer, part: r.part, capacity: r.capacity, threshold: r.threshold })),
    calibration: { tool: 'modc calibrate', data, recipe: result.recipe, report: result.report },
  };
}

/** Writes the routers and metadata atomically (temp file in the same folder, then rename). */
export function writeCalibratedRouters(path: string, result: CalibrationResult, metadata: RouterFileMetadata): void {
  const entries: [string, number[], Float32Array][] = [];
  for (const r of result.routers) {
    const p = routerTensorPrefix(r.layer, r.part);
    entries.push([`${p}.weight`, [r.weight.length], r.weight]);
    entries.push([`${p}.bias`, [], Float32Array.of(r.bias)]);
    entries.push([`${p}.threshold`, [], Float32Array.of(r.threshold)]);
  }
  const header: Record<string, unknown> = { __metadata__: { modc: JSON.stringify(metadata) } };
  let offset = 0;
  for (const [name, shape, values] of entries) {
    header[name] = { dtype: 'F32', shape, data_offsets: [offset, offset + values.byteLength] };
    offset += values.byteLength;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (Buffer.byteLength(json) % 8)) % 8);
  const headerBytes = Buffer.from(json, 'utf8');
  const buf = Buffer.alloc(8 + headerBytes.length + offset);
  buf.writeBigUInt64LE(BigInt(headerBytes.length), 0);
  headerBytes.copy(buf, 8);
  let at = 8 + headerBytes.length;
  for (const [, , values] of entries) {
    Buffer.from(values.buffer, values.byteOffset, values.byteLength).copy(buf, at);
    at += values.byteLength;
  }
  const tmp = join(dirname(path), `.${basename(path)}.tmp-${process.pid}`);
  try {
    const fd = openSync(tmp, 'w');
    try {
      writeSync(fd, buf);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, path);
  } catch (e) {
    rmSync(tmp, { force: true });
    throw e;
  }
}
