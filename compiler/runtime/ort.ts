/**
 * Thin layer over onnxruntime-node: sessions from a path, feeds from plain arrays, outputs back
 * as plain typed arrays. Everything that executes a model goes through here.
 */
import ort from 'onnxruntime-node';
import { ModcError } from '../core/errors.js';
import { halfToFloat } from '../core/ir/dtype.js';
import { cudaProviderProblem } from './cuda.js';

export type ExecutionProvider = 'cpu' | 'cuda';

export interface SessionOptions {
  executionProvider?: ExecutionProvider;
  /** ORT graph optimisation level; 'all' by default, as a user would run. */
  optimization?: 'disabled' | 'basic' | 'extended' | 'all';
  intraOpThreads?: number;
  /**
   * false: the intra-op and inter-op worker threads block when idle instead of spinning
   * (`session.intra_op.allow_spinning` / `session.inter_op.allow_spinning` = 0). With more than
   * one thread and several sessions in a process, idle sessions' spinning workers otherwise take
   * the cores the running one needs. Default: ORT's (spinning allowed).
   */
  allowSpinning?: boolean;
}

export async function createSession(path: string, opts: SessionOptions = {}): Promise<ort.InferenceSession> {
  const ep = opts.executionProvider ?? 'cpu';
  const problem = ep === 'cuda' ? cudaProviderProblem() : null;
  if (problem) throw new ModcError(problem);
  try {
    return await ort.InferenceSession.create(path, {
      executionProviders: [ep],
      graphOptimizationLevel: opts.optimization ?? 'all',
      // Errors only: ORT's CPU TensorScatter warns at every call that it copies the cache (static KV caches).
      logSeverityLevel: 3,
      ...(opts.intraOpThreads ? { intraOpNumThreads: opts.intraOpThreads } : {}),
      // Run Q/DQ nodes as ONNX defines them. ORT's QDQ fusions otherwise turn DequantizeLinear ->
      // MatMul into a matmul that quantizes the activations per tensor at run time: results then
      // depend on the other tokens of the batch, which no compiled or reference model can match.
      extra: {
        session: {
          disable_quant_qdq: '1',
          ...(opts.allowSpinning === false ? { 'intra_op.allow_spinning': '0', 'inter_op.allow_spinning': '0' } : {}),
        },
      },
    });
  } catch (e) {
    const msg = (e as Error).message.split('\n')[0];
    if (ep === 'cuda') throw new ModcError(`cannot create a CUDA session for ${path}: ${msg} (see docs/serving.md, "CUDA")`);
    throw new ModcError(`onnxruntime cannot load ${path}: ${msg}`);
  }
}

export type Feeds = Record<string, ort.Tensor>;

export function int64Tensor(data: ArrayLike<number>, dims: number[]): ort.Tensor {
  return new ort.Tensor('int64', BigInt64Array.from(Array.from(data, (v) => BigInt(v))), dims);
}

export function int32Tensor(data: ArrayLike<number>, dims: number[]): ort.Tensor {
  return new ort.Tensor('int32', Int32Array.from(data), dims);
}

export function float32Tensor(data: ArrayLike<number>, dims: number[]): ort.Tensor {
  return new ort.Tensor('float32', Float32Array.from(data), dims);
}

/** An empty tensor of the given type (e.g. a past cache of length 0). */
export function emptyTensor(type: 'float32' | 'float16', dims: number[]): ort.Tensor {
  const n = dims.reduce((a, b) => a * b, 1);
  return new ort.Tensor(type, type === 'float32' ? new Float32Array(n) : new Uint16Array(n), dims);
}

/** Tensor data as float32 (float16 widened). */
export function toFloat32(t: ort.Tensor): Float32Array {
  if (t.type === 'float32') return t.data as Float32Array;
  if (t.type === 'float16') {
    const d = t.data as Uint16Array | Float32Array;
    if (d instanceof Float32Array) return d;
    const out = new Float32Array(d.length);
    for (let i = 0; i < d.length; i++) out[i] = halfToFloat(d[i]!);
    return out;
  }
  return Float32Array.from(t.data as ArrayLike<number>);
}

export { ort };
