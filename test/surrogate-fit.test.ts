/**
 * MLP surrogates as calibration fits them (compiler/apps/calibration/surrogate.ts): the ridge fit
 * of all outputs at once recovers a known linear map, the rank reduction keeps the directions
 * that carry most of the fitted values' variance, and the eigenvector routine it rests on.
 */
import { describe, expect, it } from 'vitest';
import { applySurrogate, defaultRanks, fitSurrogate, fitSurrogates, SurrogateStats, topEigenvectors } from '../compiler/apps/calibration/surrogate.js';
import { mulberry32 } from '../compiler/core/random.js';

/** Standard normal draws (Box-Muller) from a seeded generator. */
function normals(n: number, seed: number): Float64Array {
  const next = mulberry32(seed);
  const out = new Float64Array(n);
  for (let i = 0; i < n; i += 2) {
    const r = Math.sqrt(-2 * Math.log(1 - next()));
    const t = 2 * Math.PI * next();
    out[i] = r * Math.cos(t);
    if (i + 1 < n) out[i + 1] = r * Math.sin(t);
  }
  return out;
}

/** u [N, H] standard normal, m = u W + c. */
function data(N: number, H: number, W: Float64Array, c: Float64Array, seed: number): { u: Float32Array; m: Float32Array } {
  const u = Float32Array.from(normals(N * H, seed));
  const m = new Float32Array(N * H);
  for (let t = 0; t < N; t++)
    for (let j = 0; j < H; j++) {
      let v = c[j]!;
      for (let i = 0; i < H; i++) v += u[t * H + i]! * W[i * H + j]!;
      m[t * H + j] = v;
    }
  return { u, m };
}

const rows = (n: number) => Int32Array.from({ length: n }, (_, i) => i);

/** Orthonormal columns (Gram-Schmidt) of a seeded random [H, k] matrix. */
function orthonormal(H: number, k: number, seed: number): Float64Array {
  const a = normals(H * k, seed);
  for (let c = 0; c < k; c++) {
    for (let p = 0; p < c; p++) {
      let dot = 0;
      for (let i = 0; i < H; i++) dot += a[i * k + c]! * a[i * k + p]!;
      for (let i = 0; i < H; i++) a[i * k + c] -= dot * a[i * k + p]!;
    }
    let norm = 0;
    for (let i = 0; i < H; i++) norm += a[i * k + c]! ** 2;
    for (let i = 0; i < H; i++) a[i * k + c] /= Math.sqrt(norm);
  }
  return a;
}

describe('MLP surrogate fit', () => {
  it('recovers a known full-rank linear map and offset from (u, m) sums', () => {
    const H = 10;
    const W = normals(H * H, 7);
    const c = normals(H, 8);
    const { u, m } = data(3000, H, W, c, 9);
    const stats = new SurrogateStats(H);
    stats.add(u, m, rows(1500));
    stats.add(u.subarray(1500 * H), m.subarray(1500 * H), rows(1500));
    const s = fitSurrogate(stats, 1e-9, H);
    expect(s.rank).toBe(H);
    expect(s.r2).toBeGreaterThan(1 - 1e-6);
    // A . B is W, the bias is c.
    for (let i = 0; i < H; i++)
      for (let j = 0; j < H; j++) {
        let ab = 0;
        for (let q = 0; q < H; q++) ab += s.a[i * H + q]! * s.b[q * H + j]!;
        expect(Math.abs(ab - W[i * H + j]!), `W[${i}][${j}]`).toBeLessThan(1e-3);
      }
    for (let j = 0; j < H; j++) expect(Math.abs(s.bias[j]! - c[j]!)).toBeLessThan(1e-3);
    // On fresh inputs, s(u) is u W + c.
    const fresh = data(20, H, W, c, 10);
    const pred = applySurrogate(s, fresh.u, rows(20), H);
    for (let k = 0; k < pred.length; k++) expect(Math.abs(pred[k]! - fresh.m[k]!)).toBeLessThan(2e-3);
  });

  it('at rank r keeps the r strongest directions of the map: exact at its rank, the top singular values below it', () => {
    const H = 12;
    // W = sum_k sigma_k a_k b_k^T with orthonormal a, b and sigma = 3, 2, 1: rank 3.
    const sigma = [3, 2, 1];
    const A = orthonormal(H, 3, 21);
    const B = orthonormal(H, 3, 22);
    const W = new Float64Array(H * H);
    for (let k = 0; k < 3; k++) for (let i = 0; i < H; i++) for (let j = 0; j < H; j++) W[i * H + j] += sigma[k]! * A[i * 3 + k]! * B[j * 3 + k]!;
    const c = normals(H, 23);
    const { u, m } = data(20000, H, W, c, 24);
    const stats = new SurrogateStats(H);
    stats.add(u, m, rows(20000));
    const r3 = fitSurrogate(stats, 1e-9, 3);
    expect(r3.a.length).toBe(H * 3);
    expect(r3.b.length).toBe(3 * H);
    expect(r3.r2).toBeGreaterThan(1 - 1e-6);
    // u is about isotropic, so rank 2 explains (9 + 4) / 14 of m's variance and rank 1 explains 9 / 14.
    const r2 = fitSurrogate(stats, 1e-9, 2);
    expect(Math.abs(r2.r2 - 13 / 14)).toBeLessThan(0.01);
    const r1 = fitSurrogate(stats, 1e-9, 1);
    expect(Math.abs(r1.r2 - 9 / 14)).toBeLessThan(0.01);
    // Rank 1's B row is the strongest output direction b_1 (up to sign).
    let dot = 0;
    for (let j = 0; j < H; j++) dot += r1.b[j]! * B[j * 3]!;
    expect(Math.abs(Math.abs(dot) - 1)).toBeLessThan(0.01);
  });

  it('topEigenvectors returns the eigenvectors of the largest eigenvalues, in order', () => {
    const d = 6;
    const Q = orthonormal(d, d, 31);
    const lambda = [0.5, 4, -1, 2, 0.1, 3];
    const M = new Float64Array(d * d);
    for (let k = 0; k < d; k++) for (let i = 0; i < d; i++) for (let j = 0; j < d; j++) M[i * d + j] += lambda[k]! * Q[i * d + k]! * Q[j * d + k]!;
    const V = topEigenvectors(M, d, 3);
    // Largest: 4 (column 1 of Q), 3 (column 5), 2 (column 3).
    [1, 5, 3].forEach((col, c) => {
      let dot = 0;
      for (let i = 0; i < d; i++) dot += V[i * 3 + c]! * Q[i * d + col]!;
      expect(Math.abs(Math.abs(dot) - 1), `eigenvector ${c}`).toBeLessThan(1e-9);
    });
  });

  it('topEigenvectors above 256 dimensions (subspace iteration) finds the top eigenvectors too', () => {
    const d = 300;
    const Q = orthonormal(d, 6, 41);
    // PSD: eigenvalues 10, 8, 6, 4 on four known directions, 1 on two more, small isotropic noise.
    const lambda = [10, 8, 6, 4, 1, 1];
    const M = new Float64Array(d * d);
    for (let i = 0; i < d; i++) M[i * d + i] = 0.01;
    for (let k = 0; k < 6; k++) for (let i = 0; i < d; i++) for (let j = 0; j < d; j++) M[i * d + j] += lambda[k]! * Q[i * 6 + k]! * Q[j * 6 + k]!;
    const V = topEigenvectors(M, d, 4);
    for (let c = 0; c < 4; c++) {
      let dot = 0;
      for (let i = 0; i < d; i++) dot += V[i * 4 + c]! * Q[i * 6 + c]!;
      expect(Math.abs(Math.abs(dot) - 1), `eigenvector ${c}`).toBeLessThan(1e-6);
    }
  });

  it('fitSurrogates at several ranks gives what fitSurrogate gives at each', () => {
    const H = 8;
    const W = normals(H * H, 51);
    const { u, m } = data(500, H, W, normals(H, 52), 53);
    const stats = new SurrogateStats(H);
    stats.add(u, m, rows(500));
    const both = fitSurrogates(stats, 1e-3, [2, 5]);
    [2, 5].forEach((r, i) => {
      const one = fitSurrogate(stats, 1e-3, r);
      expect(both[i]!.rank).toBe(r);
      expect(both[i]!.r2).toBeCloseTo(one.r2, 10);
      both[i]!.bias.forEach((v, j) => expect(v).toBeCloseTo(one.bias[j]!, 5));
    });
    expect(both[1]!.r2).toBeGreaterThan(both[0]!.r2);
  });

  it('default ranks are about 5% and 10% of the MLP MACs, multiples of 8', () => {
    // quality-lm: H 160, MLP 107,520 MACs per token: 16.8 -> 16 and 33.6 -> 32.
    expect(defaultRanks(107520, 160)).toEqual([16, 32]);
  });
});
