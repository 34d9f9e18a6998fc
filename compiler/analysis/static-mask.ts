/**
 * What the attn_mask of a static-cache Attention computes, read off its nodes by symbolic
 * evaluation rather than by counting comparisons.
 *
 * A static cache is a buffer of M slots; this call's S tokens are written at write_indices[b]
 * onwards, and nonpad_kv_seqlen[b] counts the row's valid slots after the write. Every value of
 * the mask's subgraph is evaluated as an integer affine form over four symbols, each varying
 * along one axis of the tensor:
 *
 *   t  the call's token index   (Range(0, S) with S = dim 1 of input_ids / inputs_embeds / position_ids)
 *   j  the cache slot           (Range(0, M) with M = the buffer's length: Shape of a static buffer, or a constant)
 *   w  write_indices[b]         (the input TensorScatter writes at)
 *   n  nonpad_kv_seqlen[b]      (the Attention's input 6)
 *
 * Range, Add, Sub, Neg, Mul by a constant, Unsqueeze, Squeeze, Expand, Cast and Identity keep
 * the form; a comparison of two forms is one linear constraint f <= 0 (integers: a < b is
 * a - b + 1 <= 0); And joins constraints, Not negates one; Where(c, 0, very negative) turns the
 * conjunction into an additive bias (and Add of two biases joins them). Anything else (Or,
 * Equal, another graph input, an op not listed) leaves the mask unread, naming the node.
 *
 * With q = w + t (the slot the query is written to, which is its position on a full buffer),
 * three constraints are recognised:
 *
 *   j <= q          causality
 *   q - j < W       a sliding window of W slots (W >= 1)
 *   j < n           validity (the slot holds a key written so far)
 *
 * A mask that is exactly a conjunction of these (causality present, unless the op adds it with
 * is_causal=1) is understood: a compacted cache keeps causality and validity by slot (the order
 * of keys is kept, and the layer's own valid count replaces nonpad), and takes the window by
 * original position (compiler/passes/static-cache.ts).
 *
 * A growing cache's mask (past and present, attention_mask [B, M] over every key) is read the
 * same way with `keyMask` set (compiler/analysis/attention.ts causalKeyMask): M and S are then
 * scalar symbols, the query's slot is M - S + t (a Range(M - S, M) of the call's tokens), and
 * attention_mask[b, j], cast to bool, is a conjunct of its own: the key's validity.
 */
import type { Node, Value } from '../core/ir/graph.js';
import { DataType } from '../core/ir/dtype.js';
import { Tensor } from '../core/ir/tensor.js';
import { isDefaultDomain } from './ops.js';

/**
 * S and M: the call's token count and the buffer's length as scalars (a growing cache's mask
 * computes with them: its query slot is M - S + t). vb, vj: a growing cache's attention_mask
 * [B, M] (its row along one axis, its slot along another); a conjunct that is exactly
 * vb + vj reads "attention_mask[b, j] is set".
 */
type Sym = 't' | 'j' | 'w' | 'n' | 'S' | 'M' | 'vb' | 'vj';

/** The axis of a scalar symbol: the same at every index. */
const SCALAR = -1;

/** sum coef * sym (sym varying along `axis` of a tensor of rank `rank`) + c, the same at every other index. */
interface Lin {
  kind: 'lin';
  rank: number;
  terms: Map<Sym, { coef: number; axis: number }>;
  c: number;
}

/** A length: the call's token count S or the buffer's length M, as a scalar or a [1] vector. */
interface Dim {
  kind: 'dim';
  of: 'S' | 'M';
  rank: number;
}

/** Shape(source)[start:end] (end exclusive; null: to the end). */
interface ShapeVec {
  kind: 'shape';
  source: Value;
  start: number;
  end: number | null;
}

/** A constrained index set: the key is visible iff every constraint f <= 0 holds. `bias`: as an additive mask (0 or very negative). */
interface Cond {
  kind: 'cond' | 'bias';
  rank: number;
  constraints: { f: Lin; node: Node }[];
}

/** The constant 0..length-1 (a precomputed arange, where an exporter has no Range). */
interface Arange {
  kind: 'arange';
  length: number;
}

type Sv = Lin | Dim | ShapeVec | Cond | Arange;

class Unread extends Error {}

/** What a static-cache mask computes. */
export interface StaticMaskSemantics {
  causal: boolean;
  /** A query at q sees slots j with q - j < window; null: no window. */
  window: number | null;
  validity: boolean;
}

export interface StaticMaskContext {
  /** The write index input (TensorScatter's input 2 source) and nonpad_kv_seqlen. */
  write: Value | null;
  nonpad: Value | null;
  /** Static buffers (TensorScatter inputs 0 and outputs) with their sequence axis. */
  buffers: ReadonlyMap<Value, number>;
  /** The buffers' length, when static. */
  length: number | null;
  /** Graph inputs of shape [B, S, ...] whose dim 1 is the call's token count. */
  tokenInputs: ReadonlySet<Value>;
  /**
   * A growing cache's attention_mask [B, M] (M keys: the past, then this call's S tokens), which
   * the mask reads as data; null for a static cache. Its length M is then a buffer's length, and
   * the query's slot M - S + t stands where write_indices + t does.
   */
  keyMask?: Value | null;
}

/** Large enough to mask a key in an additive bias (float16's lowest is -65504). */
const MASKED = -1e4;
/** Constants read for their values (an arange of a buffer's slots can be long). */
const MAX_CONSTANT = 1 << 16;

/** The mask's semantics, or why it cannot be read (one clause naming the node). */
export function staticMaskSemantics(mask: Value, ctx: StaticMaskContext): StaticMaskSemantics | { reason: string } {
  const memo = new Map<Value, Sv>();
  let top: Sv;
  try {
    top = evaluate(mask, ctx, memo);
  } catch (e) {
    if (e instanceof Unread) return { reason: e.message };
    throw e;
  }
  if (top.kind !== 'cond' && top.kind !== 'bias') return { reason: `is not a boolean mask or an additive bias of comparisons (${mask})` };
  // The mask broadcasts to [B, heads, S, M]: t on axis 2, j on axis 3, the per-row inputs on axis 0.
  const want: Record<Sym, number> = { t: 2, j: 3, w: 0, n: 0, S: SCALAR, M: SCALAR, vb: 0, vj: 3 };
  const out: StaticMaskSemantics = { causal: false, window: null, validity: false };
  for (const { f, node } of top.constraints) {
    for (const [sym, term] of f.terms) {
      const axis = term.axis === SCALAR ? SCALAR : term.axis + (4 - top.rank);
      if (axis !== want[sym]) return { reason: `compares ${symbolName(sym)} along axis ${axis} of the mask in ${node.describe()}, not axis ${want[sym]}` };
    }
    // A growing cache: attention_mask[b, j] itself is its validity.
    if (isKeyMask(f)) {
      out.validity = true;
      continue;
    }
    const k = (s: Sym) => f.terms.get(s)?.coef ?? 0;
    if (k('vb') || k('vj')) return { reason: `${node.describe()} computes with the values of attention_mask, which modc reads only as "the key is set"` };
    // A growing cache's query slot is M - S + t: its write index is M - S.
    if (k('S') !== -k('M')) return { reason: `${node.describe()} compares with the lengths in a way modc does not read (the query's slot is M - S + t)` };
    const [t, j, w, n] = [k('t'), k('j'), k('w') + k('M'), k('n')];
    if (t === 0 && j === 0 && w === 0 && n === 0) {
      if (f.c <= 0) continue;
      return { reason: `masks every key (${node.describe()} is never true)` };
    }
    if (j > 0 && t === -j && w === -j && n === 0 && f.c === 0) out.causal = true;
    else if (j < 0 && t === -j && w === -j && n === 0 && Number.isInteger(f.c / j) && f.c / j + 1 >= 1) {
      const size = f.c / j + 1;
      out.window = out.window === null ? size : Math.min(out.window, size);
    } else if (j > 0 && n === -j && t === 0 && w === 0 && f.c === j) out.validity = true;
    else
      return {
        reason: `${node.describe()} compares cache slots in a way modc does not read as causality (slot <= write_indices + t), a window (write_indices + t - slot < W) or validity (slot < nonpad_kv_seqlen)`,
      };
  }
  return out;
}

const symbolName = (s: Sym) =>
  ({
    t: 'the token index',
    j: 'the cache slot',
    w: 'write_indices',
    n: 'nonpad_kv_seqlen',
    S: "the call's token count",
    M: 'the key count',
    vb: "attention_mask's row",
    vj: "attention_mask's key",
  })[s];

function evaluate(v: Value | null, ctx: StaticMaskContext, memo: Map<Value, Sv>): Sv {
  if (!v) throw new Unread('reads an omitted input');
  const known = memo.get(v);
  if (known) return known;
  const out = evaluateUncached(v, ctx, memo);
  memo.set(v, out);
  return out;
}

function evaluateUncached(v: Value, ctx: StaticMaskContext, memo: Map<Value, Sv>): Sv {
  if (v === ctx.write) return lin(1, { w: 0 }, 0);
  if (ctx.keyMask && v === ctx.keyMask) return lin(2, { vb: 0, vj: 1 }, 0);
  if (v === ctx.nonpad) return lin(1, { n: 0 }, 0);
  const constant = constantOf(v);
  if (constant) return constant;
  const n = v.producer;
  if (!n) throw new Unread(`reads ${v}, which is neither write_indices, nonpad_kv_seqlen nor a constant`);
  if (!isDefaultDomain(n)) throw new Unread(`is computed by ${n.describe()}, an op modc does not read in a mask`);
  const arg = (i: number) => {
    const x = n.input(i);
    if (!x) throw new Unread(`${n.describe()} has no input ${i}`);
    return evaluate(x, ctx, memo);
  };
  switch (n.opType) {
    case 'Identity':
      return arg(0);
    case 'Cast':
      return cast(n, arg(0));
    case 'Shape': {
      const src = n.input(0);
      if (!src) throw new Unread(`${n.describe()} has no input`);
      if (!ctx.buffers.has(src) && !ctx.tokenInputs.has(src))
        throw new Unread(`${n.describe()} reads the shape of ${src}, which is neither a static buffer nor a token input`);
      const start = n.attrInt('start', 0) ?? 0;
      const end = n.attrInt('end') ?? null;
      if (end !== null && start >= 0 && end === start + 1) return dimOf(n, src, start, 1, ctx);
      if (start < 0 || (end !== null && end < 0)) throw new Unread(`${n.describe()} takes a shape slice modc does not read`);
      return { kind: 'shape', source: src, start, end };
    }
    case 'Gather':
      return gatherDim(n, arg(0), arg(1), ctx);
    case 'Slice':
      return slice(n, ctx, memo);
    case 'Squeeze':
    case 'Unsqueeze':
      return squeezeOrUnsqueeze(n, arg(0), axesInput(n));
    case 'Expand':
      return expand(n, arg(0));
    case 'Range':
      return range(n, arg(0), arg(1), arg(2), ctx);
    case 'Add':
    case 'Sub':
      return addSub(n, arg(0), arg(1), ctx);
    case 'Neg':
      return scale(n, asLin(n, arg(0), ctx), -1);
    case 'Mul': {
      const [a, b] = [asLin(n, arg(0), ctx), asLin(n, arg(1), ctx)];
      if (a.terms.size === 0) return scale(n, b, a.c, a.rank);
      if (b.terms.size === 0) return scale(n, a, b.c, b.rank);
      throw new Unread(`${n.describe()} multiplies two varying values`);
    }
    case 'Less':
    case 'LessOrEqual':
    case 'Greater':
    case 'GreaterOrEqual':
      return compare(n, asLin(n, arg(0), ctx), asLin(n, arg(1), ctx));
    case 'And': {
      const [a, b] = [asCond(n, arg(0), 'cond'), asCond(n, arg(1), 'cond')];
      return join('cond', a, b);
    }
    case 'Not': {
      const a = asCond(n, arg(0), 'cond');
      if (a.constraints.length !== 1) throw new Unread(`${n.describe()} negates a conjunction (a disjunction modc does not read)`);
      const f = a.constraints[0]!.f;
      // not (f <= 0)  <=>  f >= 1  <=>  1 - f <= 0
      return { kind: 'cond', rank: a.rank, constraints: [{ f: addLin(scaleLin(f, -1), lin(0, {}, 1)), node: a.constraints[0]!.node }] };
    }
    case 'Where': {
      const cond = asCond(n, arg(0), 'cond');
      const [x, y] = [arg(1), arg(2)];
      const value = (s: Sv) => (s.kind === 'lin' && s.terms.size === 0 ? s.c : null);
      const [a, b] = [value(x), value(y)];
      const rankOf = (s: Sv) => (s.kind === 'lin' || s.kind === 'cond' || s.kind === 'bias' ? s.rank : 0);
      const rank = Math.max(cond.rank, rankOf(x), rankOf(y));
      if (a === 0 && b !== null && b <= MASKED) return { kind: 'bias', rank, constraints: shiftAll(cond, rank) };
      if (b === 0 && a !== null && a <= MASKED) {
        if (cond.constraints.length !== 1) throw new Unread(`${n.describe()} masks where a conjunction holds (a disjunction modc does not read)`);
        const f = cond.constraints[0]!.f;
        return { kind: 'bias', rank, constraints: [{ f: shift(addLin(scaleLin(f, -1), lin(0, {}, 1)), rank), node: cond.constraints[0]!.node }] };
      }
      throw new Unread(`${n.describe()} chooses between values other than 0 and a large negative bias`);
    }
    default:
      throw new Unread(`is computed by ${n.describe()}, an op modc does not read in a mask`);
  }
}

function lin(rank: number, axes: Partial<Record<Sym, number>>, c: number): Lin {
  const terms = new Map<Sym, { coef: number; axis: number }>();
  for (const [s, axis] of Object.entries(axes) as [Sym, number][]) terms.set(s, { coef: 1, axis });
  return { kind: 'lin', rank, terms, c };
}

/** A small constant: a scalar-like value (every element equal) or an arange. */
function constantOf(v: Value): Sv | null {
  const t = constantTensor(v);
  if (!t) return null;
  const values = t.values;
  if (values.length === 0) throw new Unread(`reads the empty constant ${v}`);
  if (values.every((x) => x === values[0])) return { kind: 'lin', rank: t.dims.length, terms: new Map(), c: values[0]! };
  if (t.dims.length === 1 && values.every((x, i) => x === i)) return { kind: 'arange', length: values.length };
  throw new Unread(`reads the constant ${v}, whose values vary`);
}

function constantTensor(v: Value | null): { dims: number[]; values: number[] } | null {
  if (!v) return null;
  const read = (t: Tensor) => {
    if (t.isExternal || t.size > MAX_CONSTANT) return null;
    try {
      return { dims: t.dims, values: t.toNumbers() };
    } catch {
      return null;
    }
  };
  if (v.initializer) return read(v.initializer);
  const n = v.producer;
  if (!n || n.opType !== 'Constant' || !isDefaultDomain(n)) return null;
  const a = n.attr('value');
  if (a?.t) return read(new Tensor(a.t));
  const int = n.attr('value_int') ? n.attrInt('value_int') : undefined;
  const float = n.attr('value_float') ? n.attrFloat('value_float') : undefined;
  if (int !== undefined || float !== undefined) return { dims: [], values: [(int ?? float)!] };
  const ints = n.attr('value_ints') ? n.attrInts('value_ints') : undefined;
  if (ints) return { dims: [ints.length], values: ints };
  const floats = n.attr('value_floats')?.floats;
  if (floats?.length) return { dims: [floats.length], values: [...floats] };
  return null;
}

function cast(n: Node, a: Sv): Sv {
  const to = n.attrInt('to');
  if (to === DataType.BOOL) {
    if (a.kind === 'cond') return a;
    if (a.kind === 'lin' && isKeyMask(a)) return { kind: 'cond', rank: a.rank, constraints: [{ f: a, node: n }] };
    throw new Unread(`${n.describe()} casts a value that is not a comparison to bool`);
  }
  if (a.kind === 'bias' && (to === DataType.FLOAT || to === DataType.FLOAT16 || to === DataType.BFLOAT16 || to === DataType.DOUBLE)) return a;
  if (a.kind === 'lin' || a.kind === 'dim' || a.kind === 'arange' || a.kind === 'shape') {
    const integral = [DataType.INT64, DataType.INT32, DataType.FLOAT, DataType.DOUBLE].includes(to as never);
    if (integral) return a;
  }
  throw new Unread(`${n.describe()} casts to a type modc does not read in a mask`);
}

/** attention_mask[b, j] itself (vb + vj), possibly moved to other axes. */
function isKeyMask(a: Sv): boolean {
  return a.kind === 'lin' && a.c === 0 && a.terms.size === 2 && a.terms.get('vb')?.coef === 1 && a.terms.get('vj')?.coef === 1;
}

function asLin(n: Node, a: Sv, ctx: StaticMaskContext): Lin {
  if (a.kind === 'lin') return a;
  // A growing cache's mask computes with its lengths (the query's slot M - S + t).
  if (a.kind === 'dim' && ctx.keyMask) return { kind: 'lin', rank: a.rank, terms: new Map([[a.of, { coef: 1, axis: SCALAR }]]), c: 0 };
  // A precomputed arange of the buffer's length is its slots.
  if (a.kind === 'arange' && a.length === ctx.length) return lin(1, { j: 0 }, 0);
  if (a.kind === 'dim') throw new Unread(`${n.describe()} computes with a length, not an index`);
  throw new Unread(`${n.describe()} reads a value that is not an integer index`);
}

function asCond(n: Node, a: Sv, kind: 'cond' | 'bias'): Cond {
  if (a.kind === kind) return a;
  throw new Unread(`${n.describe()} reads a value that is not a ${kind === 'cond' ? 'comparison' : 'bias'}`);
}

/** Moves a form into a tensor of rank `rank` (right-aligned broadcasting). */
function shift(f: Lin, rank: number): Lin {
  const d = rank - f.rank;
  const terms = new Map([...f.terms].map(([s, t]) => [s, { coef: t.coef, axis: t.axis === SCALAR ? SCALAR : t.axis + d }] as const));
  return { kind: 'lin', rank, terms, c: f.c };
}

function shiftAll(c: Cond, rank: number): { f: Lin; node: Node }[] {
  return c.constraints.map(({ f, node }) => ({ f: shift(f, rank), node }));
}

function addLin(a: Lin, b: Lin, node?: Node): Lin {
  const rank = Math.max(a.rank, b.rank);
  const [x, y] = [shift(a, rank), shift(b, rank)];
  const terms = new Map(x.terms);
  for (const [s, t] of y.terms) {
    const had = terms.get(s);
    if (had && had.axis !== t.axis) throw new Unread(`${node?.describe() ?? 'a node'} combines ${symbolName(s)} along two axes`);
    const coef = (had?.coef ?? 0) + t.coef;
    if (coef === 0) terms.delete(s);
    else terms.set(s, { coef, axis: t.axis });
  }
  return { kind: 'lin', rank, terms, c: x.c + y.c };
}

function scaleLin(a: Lin, k: number): Lin {
  return { kind: 'lin', rank: a.rank, terms: new Map([...a.terms].map(([s, t]) => [s, { coef: t.coef * k, axis: t.axis }] as const)), c: a.c * k };
}

function scale(n: Node, a: Lin, k: number, rankOfK = 0): Lin {
  if (!Number.isInteger(k)) throw new Unread(`${n.describe()} scales by ${k}, not an integer`);
  return shift(scaleLin(a, k), Math.max(a.rank, rankOfK));
}

function addSub(n: Node, a: Sv, b: Sv, ctx: StaticMaskContext): Sv {
  if (n.opType === 'Add' && a.kind === 'bias' && b.kind === 'bias') return join('bias', a, b);
  const [x, y] = [asLin(n, a, ctx), asLin(n, b, ctx)];
  return addLin(x, n.opType === 'Sub' ? scaleLin(y, -1) : y, n);
}

function join(kind: 'cond' | 'bias', a: Cond, b: Cond): Cond {
  const rank = Math.max(a.rank, b.rank);
  return { kind, rank, constraints: [...shiftAll(a, rank), ...shiftAll(b, rank)] };
}

function compare(n: Node, a: Lin, b: Lin): Cond {
  for (const x of [a, b]) if (!Number.isInteger(x.c)) throw new Unread(`${n.describe()} compares with ${x.c}, not an integer`);
  // Integers: a < b <=> a - b + 1 <= 0; a > b <=> b - a + 1 <= 0.
  const f =
    n.opType === 'Less'
      ? addLin(addLin(a, scaleLin(b, -1), n), lin(0, {}, 1))
      : n.opType === 'LessOrEqual'
        ? addLin(a, scaleLin(b, -1), n)
        : n.opType === 'Greater'
          ? addLin(addLin(b, scaleLin(a, -1), n), lin(0, {}, 1))
          : addLin(b, scaleLin(a, -1), n);
  return { kind: 'cond', rank: f.rank, constraints: [{ f, node: n }] };
}

/** Axes of Unsqueeze/Squeeze: input 1 (opset 13+) or the attribute. */
function axesInput(n: Node): number[] | null {
  const attr = n.attrInts('axes');
  if (attr) return attr;
  const x = n.input(1);
  if (!x) return null;
  const c = constantTensor(x);
  if (!c) throw new Unread(`${n.describe()} takes axes that are not a constant`);
  return c.values;
}

function squeezeOrUnsqueeze(n: Node, a: Sv, axes: number[] | null): Sv {
  const unsqueeze = n.opType === 'Unsqueeze';
  if (a.kind === 'dim') {
    if (unsqueeze && a.rank === 0 && axes?.length === 1) return { ...a, rank: 1 };
    if (!unsqueeze && a.rank === 1 && (!axes || (axes.length === 1 && (axes[0] === 0 || axes[0] === -1)))) return { ...a, rank: 0 };
    throw new Unread(`${n.describe()} reshapes a length`);
  }
  if (a.kind !== 'lin' && a.kind !== 'cond' && a.kind !== 'bias') throw new Unread(`${n.describe()} reshapes a value modc does not read`);
  if (!axes) throw new Unread(`${n.describe()} has no axes`);
  const rankIn = a.rank;
  const rankOut = unsqueeze ? rankIn + axes.length : rankIn - axes.length;
  const norm = axes.map((x) => (x < 0 ? x + (unsqueeze ? rankOut : rankIn) : x)).sort((p, q) => p - q);
  // Old axis -> new axis.
  const map = (axis: number): number => {
    if (unsqueeze) {
      let out = axis;
      for (const x of norm) if (x <= out) out++;
      return out;
    }
    if (norm.includes(axis)) throw new Unread(`${n.describe()} squeezes an axis an index varies along`);
    return axis - norm.filter((x) => x < axis).length;
  };
  const move = (f: Lin): Lin => ({
    kind: 'lin',
    rank: rankOut,
    terms: new Map([...f.terms].map(([s, t]) => [s, { coef: t.coef, axis: t.axis === SCALAR ? SCALAR : map(t.axis) }] as const)),
    c: f.c,
  });
  if (a.kind === 'lin') return move(a);
  return { kind: a.kind, rank: rankOut, constraints: a.constraints.map(({ f, node }) => ({ f: move(shift(f, rankIn)), node })) };
}

/** The length of a 1-D shape value: declared, constant, or a Concat of such (Shape slices, picked or unsqueezed dims). */
function shapeLength(v: Value | null, depth = 0): number | undefined {
  if (!v || depth > 4) return undefined;
  const declared = v.shape?.[0];
  if (typeof declared === 'number') return declared;
  const constant = constantTensor(v);
  if (constant) return constant.values.length;
  const p = v.producer;
  if (!p || !isDefaultDomain(p)) return undefined;
  if (p.opType === 'Concat') {
    const parts = p.inputs.map((x) => shapeLength(x, depth + 1));
    return parts.every((x) => x !== undefined) ? parts.reduce((a, b) => a! + b!, 0) : undefined;
  }
  if (p.opType === 'Shape') {
    const rank = p.input(0)?.shape?.length;
    if (rank === undefined) return undefined;
    const clamp = (x: number) => Math.min(rank, Math.max(0, x < 0 ? x + rank : x));
    return Math.max(0, clamp(p.attrInt('end') ?? rank) - clamp(p.attrInt('start', 0) ?? 0));
  }
  if (p.opType === 'Unsqueeze' && p.input(0)?.shape?.length === 0) return 1;
  // A Gather of dims by a 1-D constant index: as many as it picks.
  const picked = p.opType === 'Gather' ? constantTensor(p.input(1)) : null;
  if (picked && picked.dims.length === 1) return picked.values.length;
  return undefined;
}

function expand(n: Node, a: Sv): Sv {
  const length = shapeLength(n.input(1));
  if (typeof length !== 'number') throw new Unread(`${n.describe()} expands to a shape of unknown rank`);
  if (a.kind === 'lin') return shift(a, Math.max(a.rank, length));
  if (a.kind === 'cond' || a.kind === 'bias') {
    const rank = Math.max(a.rank, length);
    return { kind: a.kind, rank, constraints: shiftAll(a, rank) };
  }
  throw new Unread(`${n.describe()} expands a value modc does not read`);
}

function gatherDim(n: Node, data: Sv, index: Sv, ctx: StaticMaskContext): Sv {
  if (data.kind !== 'shape' || index.kind !== 'lin' || index.terms.size !== 0 || index.rank > 1 || (n.attrInt('axis', 0) ?? 0) !== 0) {
    throw new Unread(`${n.describe()} gathers something other than a dim of a shape`);
  }
  const axis = index.c >= 0 ? data.start + index.c : (data.end ?? data.source.shape?.length ?? NaN) + index.c;
  return dimOf(n, data.source, axis, index.rank, ctx);
}

function dimOf(n: Node, source: Value, axis: number, rank: number, ctx: StaticMaskContext): Dim {
  const seq = ctx.buffers.get(source);
  const r = source.shape?.length;
  const a = axis < 0 && r !== undefined ? axis + r : axis;
  if (seq !== undefined && a === seq) return { kind: 'dim', of: 'M', rank };
  if (ctx.tokenInputs.has(source) && a === 1) return { kind: 'dim', of: 'S', rank };
  throw new Unread(`${n.describe()} reads dim ${axis} of ${source}, which is neither the call's token count nor the buffer's length`);
}

function slice(n: Node, ctx: StaticMaskContext, memo: Map<Value, Sv>): Sv {
  const data = evaluate(n.input(0), ctx, memo);
  const consts = (i: number) => constantTensor(n.input(i))?.values;
  const starts = consts(1);
  const axes = n.input(3) ? consts(3) : [0];
  const steps = n.input(4) ? consts(4) : [1];
  if (!starts || starts.length !== 1 || !axes || axes.length !== 1 || axes[0] !== 0 || !steps || steps[0] !== 1) {
    throw new Unread(`${n.describe()} slices in a way modc does not read in a mask`);
  }
  if (data.kind === 'shape') {
    const ends = consts(2);
    if (!ends || ends.length !== 1 || ends[0] !== starts[0]! + 1) throw new Unread(`${n.describe()} slices more than one dim of a shape`);
    return dimOf(n, data.source, data.start + starts[0]!, 1, ctx);
  }
  if (data.kind === 'arange' && starts[0] === 0) {
    // arange[:S] is the call's token index (the Range-free form of an exporter for runtimes without Range).
    const end = evaluate(n.input(2), ctx, memo);
    if (end.kind === 'dim' && end.of === 'S') return lin(1, { t: 0 }, 0);
  }
  throw new Unread(`${n.describe()} slices a value modc does not read in a mask`);
}

function range(n: Node, start: Sv, limit: Sv, delta: Sv, ctx: StaticMaskContext): Sv {
  const isConst = (s: Sv, c: number) => s.kind === 'lin' && s.terms.size === 0 && s.rank === 0 && s.c === c;
  if (ctx.keyMask && isConst(delta, 1) && !isConst(start, 0)) {
    // Range(a, a + S): a growing cache's query slots a + t (the mask's a is M - S).
    const a = asLin(n, start, ctx);
    const span = addLin(asLin(n, limit, ctx), scaleLin(a, -1), n);
    const scalar = (f: Lin) => f.rank === 0 && [...f.terms.values()].every((t) => t.axis === SCALAR);
    if (scalar(a) && scalar(span) && span.c === 0 && span.terms.size === 1 && span.terms.get('S')?.coef === 1)
      return addLin(shift(a, 1), lin(1, { t: 0 }, 0), n);
    throw new Unread(`${n.describe()} ranges over neither the call's tokens, their slots nor the keys`);
  }
  if (!isConst(start, 0) || !isConst(delta, 1)) throw new Unread(`${n.describe()} is not Range(0, n, 1)`);
  if (limit.kind === 'dim' && limit.rank === 0) return lin(1, limit.of === 'S' ? { t: 0 } : { j: 0 }, 0);
  if (limit.kind === 'lin' && limit.terms.size === 0 && limit.rank === 0 && ctx.length !== null && limit.c === ctx.length) return lin(1, { j: 0 }, 0);
  throw new Unread(`${n.describe()} ranges over neither the call's tokens nor the buffer's slots`);
}
