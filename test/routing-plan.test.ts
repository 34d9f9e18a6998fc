import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadRouterFile, readRouterFile, writeRouterFile } from '../compiler/routing/router-weights.js';
import { parseLayerSpec, planRouting, prdRetention } from '../compiler/routing/routing-plan.js';
import { tempDir } from './helpers.js';

const tmp = tempDir('modc-routers');
const model = { numLayers: 6, hiddenSize: 4 };

/** A safetensors file written by hand, independent of writeRouterFile. */
function handWritten(path: string, tensors: Record<string, { dtype: string; shape: number[]; bytes: Buffer }>, metadata: Record<string, string> = {}) {
  let offset = 0;
  const header: Record<string, unknown> = { __metadata__: { format: 'pt', ...metadata } };
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
/** bfloat16 bytes of values exactly representable in it (the upper half of each float32). */
const bf16 = (...v: number[]) => {
  const out = Buffer.alloc(v.length * 2);
  new Uint32Array(Float32Array.from(v).buffer).forEach((bits, i) => out.writeUInt16LE(bits >>> 16, i * 2));
  return out;
};

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
    expect(routers.map((r) => [r.layer, r.part, Array.from(r.weight), r.bias, r.threshold])).toEqual([
      [1, 'block', [1, 2, 3, 4], 0.5, undefined],
      [3, 'block', [1, -2, 0.5, 0], -1, 0.25],
    ]);
  });

  it('reads BF16 weights and sub-layer routers under router.{l}.attn and router.{l}.mlp', () => {
    const p = join(tmp, 'parts.safetensors');
    handWritten(p, {
      'router.2.attn.weight': { dtype: 'BF16', shape: [4], bytes: bf16(1.5, -0.25, 3, -96) },
      'router.2.attn.bias': { dtype: 'BF16', shape: [], bytes: bf16(0.5) },
      'router.2.mlp.weight': { dtype: 'F32', shape: [4], bytes: f32(0.1, 0.2, 0.3, 0.4) },
      'router.2.mlp.bias': { dtype: 'F32', shape: [1], bytes: f32(-1) },
      'router.2.mlp.threshold': { dtype: 'F32', shape: [], bytes: f32(0.7) },
      'router.4.weight': { dtype: 'F16', shape: [4], bytes: Buffer.alloc(8) },
      'router.4.bias': { dtype: 'F32', shape: [], bytes: f32(0) },
    });
    expect(readRouterFile(p, model).map((r) => [r.layer, r.part, Array.from(r.weight), r.bias, r.threshold])).toEqual([
      [2, 'attention', [1.5, -0.25, 3, -96], 0.5, undefined],
      [2, 'mlp', Array.from(Float32Array.of(0.1, 0.2, 0.3, 0.4)), -1, Math.fround(0.7)],
      [4, 'block', [0, 0, 0, 0], 0, undefined],
    ]);
  });

  it('writes BF16 (rounded to nearest even), F16 and F32 with its metadata, and reads them back', () => {
    const weight = Float32Array.of(1, -2.5, 0.1, 3.0e5);
    const meta = { mode: 'topk' as const, gated: false, layers: [{ layer: 1, part: 'mlp' as const, capacity: 0.25 }], calibration: { tokens: 4096 } };
    for (const dtype of ['F32', 'F16', 'BF16'] as const) {
      const p = join(tmp, `rt-${dtype}.safetensors`);
      const w = dtype === 'F16' ? weight.slice(0, 3) : weight;
      writeRouterFile(
        p,
        [
          { layer: 1, part: 'mlp', weight: w, bias: 0.5, threshold: 0.75 },
          { layer: 0, part: 'attention', weight: w, bias: -1 },
        ],
        meta,
        { dtype },
      );
      const { routers, metadata } = loadRouterFile(p, { ...model, hiddenSize: w.length });
      expect(metadata).toEqual(meta);
      expect(routers.map((r) => [r.layer, r.part, r.bias, r.threshold])).toEqual([
        [0, 'attention', -1, undefined],
        [1, 'mlp', 0.5, 0.75],
      ]);
      const expected = { F32: Array.from(weight), F16: [1, -2.5, 0.0999755859375], BF16: [1, -2.5, 0.10009765625, 299008] }[dtype];
      expect(Array.from(routers[1]!.weight)).toEqual(expected);
    }
    writeRouterFile(join(tmp, 'rt-F16.safetensors'), [{ layer: 0, part: 'attention', weight, bias: -1 }], undefined, { dtype: 'F16' });
    // F16 cannot hold 3e5: the reader refuses the infinite weight, naming the tensor.
    expect(() => loadRouterFile(join(tmp, 'rt-F16.safetensors'), model)).toThrow(/'router\.0\.attn\.weight' holds Infinity at index 3/);
  });

  it('refuses a sub-layer router beside a whole-block router of the same layer, and bad modc metadata', () => {
    const p = join(tmp, 'clash.safetensors');
    const tensors = {
      'router.1.weight': { dtype: 'F32', shape: [4], bytes: f32(1, 2, 3, 4) },
      'router.1.bias': { dtype: 'F32', shape: [], bytes: f32(0) },
      'router.1.attn.weight': { dtype: 'F32', shape: [4], bytes: f32(1, 2, 3, 4) },
      'router.1.attn.bias': { dtype: 'F32', shape: [], bytes: f32(0) },
    };
    handWritten(p, tensors);
    expect(() => readRouterFile(p, model)).toThrow(
      /'router\.1\.attn\.weight' routes a sub-layer of layer 1, whose whole block 'router\.1\.weight' already routes/,
    );
    const ok = { 'router.1.attn.weight': tensors['router.1.attn.weight'], 'router.1.attn.bias': tensors['router.1.attn.bias'] };
    handWritten(p, ok, { modc: '{"mode": "sometimes"}' });
    expect(() => loadRouterFile(p, model)).toThrow(/__metadata__ 'modc': mode must be "threshold" or "topk"/);
    handWritten(p, ok, { modc: '{"layers": [{"layer": 9, "part": "mlp"}]}' });
    expect(() => loadRouterFile(p, model)).toThrow(/layers\[0\]\.layer must be a layer index 0-5, got 9/);
    handWritten(p, ok, { modc: 'not json' });
    expect(() => loadRouterFile(p, model)).toThrow(/__metadata__ 'modc' is not JSON/);
    handWritten(p, { 'router.1.mlp.weight': { dtype: 'BF16', shape: [3], bytes: bf16(1, 2, 3) }, 'router.1.mlp.bias': tensors['router.1.bias'] });
    expect(() => readRouterFile(p, model)).toThrow(/'router\.1\.mlp\.weight' has shape \[3\], expected \[4\]/);
    handWritten(p, { 'router.1.mlp.weight': tensors['router.1.weight'] });
    expect(() => readRouterFile(p, model)).toThrow(/layer 1 \(mlp\) has no tensor 'router\.1\.mlp\.bias'/);
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
    handWritten(p, {
      'router.2.weight': { dtype: 'F32', shape: [4], bytes: f32(1, 2, 3, 4) },
      'router.2.bias': { dtype: 'F32', shape: [], bytes: f32(0) },
      'router.2.threshold': { dtype: 'F32', shape: [], bytes: f32(1.5) },
    });
    expect(() => readRouterFile(p, model)).toThrow(/threshold must be in \[0, 1\]/);
    writeFileSync(p, 'definitely not safetensors');
    expect(() => readRouterFile(p, model)).toThrow(/not a safetensors file/);
  });

  it('writes what it reads', () => {
    const p = join(tmp, 'rt.safetensors');
    writeRouterFile(p, [{ layer: 0, weight: Float32Array.of(1, 2, 3, 4), bias: 0.5, threshold: 0.75 }]);
    expect(readRouterFile(p, model)).toEqual([{ layer: 0, part: 'block', weight: Float32Array.of(1, 2, 3, 4), bias: 0.5, threshold: 0.75 }]);
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
    expect(plan.layers.map((l) => [l.layer, l.threshold])).toEqual([
      [1, 0.3],
      [3, 0.3],
      [5, 0.3],
    ]);
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
    expect(plan.layers.map((l) => [l.layer, l.threshold])).toEqual([
      [2, 0.75],
      [4, 0.2],
    ]);
    const picked = planRouting({ ...model, routers: { kind: 'file', path: p }, layers: '1,2' });
    expect(picked.layers.map((l) => l.layer)).toEqual([2]);
    expect(picked.unconverted.find((u) => u.layer === 1)!.reason).toMatch(/no router for layer 1/);
  });

  it("a router file sets each layer's parts; its metadata sets mode, gating and capacity unless the request does", () => {
    const p = join(tmp, 'parts-plan.safetensors');
    const w = new Float32Array(4);
    writeRouterFile(
      p,
      [
        { layer: 1, part: 'attention', weight: w, bias: 0 },
        { layer: 1, part: 'mlp', weight: w, bias: 0, threshold: 0.6 },
        { layer: 3, part: 'mlp', weight: w, bias: 0 },
      ],
      {
        mode: 'topk',
        gated: false,
        layers: [
          { layer: 1, part: 'mlp', capacity: 0.25, threshold: 0.9 },
          { layer: 3, part: 'mlp', threshold: 0.8 },
        ],
      },
    );
    const plan = planRouting({ ...model, routers: { kind: 'file', path: p } });
    expect([plan.mode, plan.gated]).toEqual(['topk', false]);
    expect(plan.layers.map((l) => [l.layer, l.part, l.capacity, l.threshold])).toEqual([
      [1, 'attention', 0.5, 0.5],
      [1, 'mlp', 0.25, Math.fround(0.6)],
      [3, 'mlp', 0.5, 0.8],
    ]);
    const explicit = planRouting({ ...model, routers: { kind: 'file', path: p }, mode: 'threshold', gated: true, capacity: 0.75 });
    expect([explicit.mode, explicit.gated, explicit.layers[1]!.capacity]).toEqual(['threshold', true, 0.75]);
    const mlpOnly = planRouting({ ...model, routers: { kind: 'file', path: p }, granularity: 'mlp' });
    expect(mlpOnly.layers.map((l) => [l.layer, l.part])).toEqual([
      [1, 'mlp'],
      [3, 'mlp'],
    ]);
    expect(() => planRouting({ ...model, routers: { kind: 'file', path: p }, granularity: 'block' })).toThrow(/has no block router/);
  });

  it('router inits route the requested part of every selected layer', () => {
    const plan = planRouting({ ...model, routers: { kind: 'random', seed: 1 }, granularity: 'attention', schedule: 'every-other' });
    expect(plan.layers.map((l) => [l.layer, l.part, l.router.part])).toEqual([
      [1, 'attention', 'attention'],
      [3, 'attention', 'attention'],
      [5, 'attention', 'attention'],
    ]);
    expect(planRouting({ ...model, routers: { kind: 'all-pass' } }).layers.every((l) => l.part === 'block')).toBe(true);
  });

  it('refuses p outside [0, 1] and capacity outside (0, 1]', () => {
    const base = { ...model, routers: { kind: 'all-pass' } as const };
    expect(() => planRouting({ ...base, threshold: 1.5 })).toThrow(/--threshold must be in \[0, 1\]/);
    expect(() => planRouting({ ...base, capacity: 0 })).toThrow(/--capacity must be in \(0, 1\]/);
    expect(() => planRouting({ ...base, capacity: 1.01 })).toThrow(/--capacity/);
  });
});
