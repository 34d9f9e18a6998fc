import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readRouterFile, writeRouterFile } from '../compiler/routers.js';
import { parseLayerSpec, planRouting, prdRetention } from '../compiler/routing-plan.js';
import { tempDir } from './helpers.js';

const tmp = tempDir('modc-routers');
const model = { numLayers: 6, hiddenSize: 4 };

/** A safetensors file written by hand, independent of writeRouterFile. */
function handWritten(path: string, tensors: Record<string, { dtype: string; shape: number[]; bytes: Buffer }>) {
  let offset = 0;
  const header: Record<string, unknown> = { __metadata__: { format: 'pt' } };
  for (const [name, t] of Object.entries(tensors)) {
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.bytes.length] };
    offset += t.bytes.length;
  }
  const json = Buffer.from(JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  writeFileSync(path, Buffer.concat([len, json, ...Object.values(tensors).map((t) => t.bytes)]));
}
const f32 = (...v: number[]) => Buffer.from(Float32Array.from(v).buffer);

describe('router file', () => {
  it('reads F32 and F16 tensors with bias of shape [] or [1] and optional thresholds', () => {
    const p = join(tmp, 'ok.safetensors');
    const half = Buffer.alloc(8);
    [0x3c00, 0xc000, 0x3800, 0x0000].forEach((h, i) => half.writeUInt16LE(h, i * 2)); // 1, -2, 0.5, 0
    handWritten(p, {
      'router.1.weight': { dtype: 'F32', shape: [4], bytes: f32(1, 2, 3, 4) },
      'router.1.bias': { dtype: 'F32', shape: [], bytes: f32(0.5) },
      'router.3.weight': { dtype: 'F16', shape: [4], bytes: half },
      'router.3.bias': { dtype: 'F32', shape: [1], bytes: f32(-1) },
      'router.3.threshold': { dtype: 'F32', shape: [], bytes: f32(0.25) },
    });
    const routers = readRouterFile(p, model);
    expect(routers.map((r) => [r.layer, Array.from(r.weight), r.bias, r.threshold])).toEqual([
      [1, [1, 2, 3, 4], 0.5, undefined],
      [3, [1, -2, 0.5, 0], -1, 0.25],
    ]);
  });

  it.each([
    ['router.1.weight', { dtype: 'F32', shape: [5], bytes: f32(1, 2, 3, 4, 5) }, /'router\.1\.weight' has shape \[5\], expected \[4\]/],
    ['router.9.weight', { dtype: 'F32', shape: [4], bytes: f32(1, 2, 3, 4) }, /'router\.9\.weight' is for layer 9, but the model has 6 layers/],
    ['router.1.weight', { dtype: 'I64', shape: [4], bytes: Buffer.alloc(32) }, /'router\.1\.weight' has dtype I64/],
    ['router.1.scale', { dtype: 'F32', shape: [], bytes: f32(1) }, /unexpected tensor 'router\.1\.scale'/],
  ])('refuses %s that does not fit, naming the tensor', (name, t, pattern) => {
    const p = join(tmp, 'bad.safetensors');
    handWritten(p, { [name]: t, 'router.1.bias': { dtype: 'F32', shape: [], bytes: f32(0) } });
    expect(() => readRouterFile(p, model)).toThrow(pattern);
  });

  it('refuses a missing bias, a threshold outside [0, 1], and a file that is not safetensors', () => {
    const p = join(tmp, 'nobias.safetensors');
    handWritten(p, { 'router.2.weight': { dtype: 'F32', shape: [4], bytes: f32(1, 2, 3, 4) } });
    expect(() => readRouterFile(p, model)).toThrow(/layer 2 has no tensor 'router\.2\.bias'/);
    handWritten(p, { 'router.2.weight': { dtype: 'F32', shape: [4], bytes: f32(1, 2, 3, 4) }, 'router.2.bias': { dtype: 'F32', shape: [], bytes: f32(0) }, 'router.2.threshold': { dtype: 'F32', shape: [], bytes: f32(1.5) } });
    expect(() => readRouterFile(p, model)).toThrow(/threshold must be in \[0, 1\]/);
    writeFileSync(p, 'definitely not safetensors');
    expect(() => readRouterFile(p, model)).toThrow(/not a safetensors file/);
  });

  it('writes what it reads', () => {
    const p = join(tmp, 'rt.safetensors');
    writeRouterFile(p, [{ layer: 0, weight: Float32Array.of(1, 2, 3, 4), bias: 0.5, threshold: 0.75 }]);
    expect(readRouterFile(p, model)).toEqual([{ layer: 0, weight: Float32Array.of(1, 2, 3, 4), bias: 0.5, threshold: 0.75 }]);
  });
});

describe('routing plan', () => {
  it('parses layer selections and refuses layers the model lacks', () => {
    expect(parseLayerSpec('1,3-5', 6)).toEqual([1, 3, 4, 5]);
    expect(parseLayerSpec('odd', 6)).toEqual([1, 3, 5]);
    expect(() => parseLayerSpec('7', 6)).toThrow(/names layer 7, but the model has 6 layers/);
    expect(() => parseLayerSpec(',', 6)).toThrow(/names no layer/);
    expect(() => parseLayerSpec('x', 6)).toThrow(/cannot parse 'x'/);
  });

  it('every-other converts layers 1, 3, 5 with the uniform threshold', () => {
    const plan = planRouting({ ...model, routers: { kind: 'random', seed: 1 }, schedule: 'every-other', threshold: 0.3 });
    expect(plan.layers.map((l) => [l.layer, l.threshold])).toEqual([[1, 0.3], [3, 0.3], [5, 0.3]]);
    expect(plan.unconverted.map((u) => u.layer)).toEqual([0, 2, 4]);
  });

  it('prd keeps high-retention layers dense and floors the rest', () => {
    const r = prdRetention(6, 0.5);
    expect(r[0]).toBeCloseTo(1.0);
    expect(r[5]).toBeCloseTo(0.0);
    const plan = planRouting({ ...model, routers: { kind: 'random', seed: 1 }, schedule: 'prd', mode: 'topk', capacity: 0.5 });
    expect(plan.unconverted[0]).toMatchObject({ layer: 0 });
    expect(plan.unconverted[0]!.reason).toMatch(/dense cut-off/);
    expect(plan.layers.map((l) => l.layer)).toEqual([1, 2, 3, 4, 5]);
    expect(plan.layers.at(-1)!.capacity).toBe(0.125);
    expect(plan.layers[0]!.capacity).toBeCloseTo(r[1]!);
  });

  it('with a router file converts exactly its layers; a threshold in the file wins', () => {
    const p = join(tmp, 'plan.safetensors');
    writeRouterFile(p, [
      { layer: 2, weight: new Float32Array(4), bias: 0, threshold: 0.75 },
      { layer: 4, weight: new Float32Array(4), bias: 0 },
    ]);
    const plan = planRouting({ ...model, routers: { kind: 'file', path: p }, threshold: 0.2 });
    expect(plan.layers.map((l) => [l.layer, l.threshold])).toEqual([[2, 0.75], [4, 0.2]]);
    const picked = planRouting({ ...model, routers: { kind: 'file', path: p }, layers: '1,2' });
    expect(picked.layers.map((l) => l.layer)).toEqual([2]);
    expect(picked.unconverted.find((u) => u.layer === 1)!.reason).toMatch(/no router for layer 1/);
  });

  it('refuses p outside [0, 1] and capacity outside (0, 1]', () => {
    const base = { ...model, routers: { kind: 'all-pass' } as const };
    expect(() => planRouting({ ...base, threshold: 1.5 })).toThrow(/--threshold must be in \[0, 1\]/);
    expect(() => planRouting({ ...base, capacity: 0 })).toThrow(/--capacity must be in \(0, 1\]/);
    expect(() => planRouting({ ...base, capacity: 1.01 })).toThrow(/--capacity/);
  });
});
