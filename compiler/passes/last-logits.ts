/**
 * last-logits: compute the lm_head for one position per row, the last real token of the call.
 *
 * Pattern: `logits = MatMul|Gemm(h, W)` (optionally followed by Cast, Identity, or an
 * elementwise op with a constant operand: bias, scale, soft-capping), h `[B, S, H]`.
 * Rewrite: the MatMul reads `GatherElements(h, idx, axis=1)`, `[B, 1, H]`, where idx is, per row,
 * the last position j of this call whose `attention_mask` column is 1 (right padding: the row's
 * length - 1; left padding: S - 1); a caller's 4-D mask [B, 1, M, M] says which of the call's
 * tokens are real on its diagonal, at sequence indices from `past_sequence_length` (an input the
 * pass adds, compiler/passes/caller-mask.ts). A static KV cache (no attention_mask; write_indices and
 * nonpad_kv_seqlen per row, right padding) gives nonpad_kv_seqlen - write_indices - 1. With
 * neither it is S - 1. A decode step
 * (S = 1) gathers position 0: its logits are unchanged. The logits output becomes `[B, 1, V]`
 * and the model records `modc.logits = last` in its metadata, so a runtime knows the one
 * position it gets is each row's last real token, not position S - 1.
 *
 * The prefill of a long prompt spends a large share of its time in the lm_head (vocab x hidden
 * MACs per position); most callers only read the last position.
 */
import { ModcError } from '../core/errors.js';
import { DataType } from '../core/ir/dtype.js';
import type { Node, Value } from '../core/ir/graph.js';
import { logitsPositions, requireLogits, writeLogitsPositions } from '../metadata/logits-metadata.js';
import { decoderIo } from '../metadata/decoder-io.js';
import type { Pass } from './pass-manager.js';
import type { TypeProto } from '../core/proto/index.js';
import { defaultOpset } from './modc-ops/index.js';
import { Emitter } from './modc-ops/emitter.js';
import { callerMask, callerTokenInputs } from './caller-mask.js';

/** Ops between the lm_head and the logits output that act on each position alone. */
const TOKENWISE_UNARY = new Set(['Cast', 'Identity', 'Tanh']);
const TOKENWISE_BINARY = new Set(['Add', 'Sub', 'Mul', 'Div']);

const isConstant = (v: Value | null): boolean => !!v && (v.isConstant || v.producer?.opType === 'Constant');

/** The lm_head node: the MatMul or Gemm the logits output is computed from, position by position. */
export function findLmHead(logits: Value): { node: Node; reason?: undefined } | { node?: undefined; reason: string } {
  let v: Value = logits;
  for (let hops = 0; hops < 8; hops++) {
    const n = v.producer;
    if (!n) return { reason: `${v.name} is not computed by a node` };
    if (n.domain === '' && (n.opType === 'MatMul' || n.opType === 'Gemm')) {
      if (n.opType === 'Gemm' && n.attrInt('transA', 0) === 1) return { reason: `${n.describe()} transposes its input` };
      const rank = n.input(0)?.shape?.length;
      if (rank !== undefined && rank !== 3) return { reason: `the lm_head input ${n.input(0)!.name} has rank ${rank}, not [batch, sequence, hidden]` };
      return { node: n };
    }
    if (n.domain === '' && TOKENWISE_UNARY.has(n.opType)) v = n.input(0)!;
    else if (n.domain === '' && TOKENWISE_BINARY.has(n.opType) && isConstant(n.input(1))) v = n.input(0)!;
    else if (n.domain === '' && TOKENWISE_BINARY.has(n.opType) && isConstant(n.input(0))) v = n.input(1)!;
    else return { reason: `${n.describe()} between the lm_head and ${logits.name} is not a per-position op` };
  }
  return { reason: `no MatMul within 8 nodes of ${logits.name}` };
}

function withSequenceOne(type: TypeProto | undefined): TypeProto | undefined {
  const dims = type?.tensor_type?.shape?.dim;
  if (!dims || dims.length !== 3) return type;
  return { ...type, tensor_type: { ...type!.tensor_type!, shape: { dim: [dims[0]!, { dim_value: 1 }, dims[2]!] } } } as TypeProto;
}

export const lastLogitsPass: Pass = {
  name: 'last-logits',
  description: 'compute the lm_head for the last real position of each row only (logits [B, 1, V])',
  run(model) {
    if (logitsPositions(model) === 'last') return { changed: false, notes: ['logits are already last-position only'] };
    requireLogits(model, '--logits last');
    const g = model.graph;
    const logits = g.outputs.find((v) => v.name === 'logits') ?? g.outputs[0];
    if (!logits) throw new ModcError('the model has no outputs');
    const found = findLmHead(logits);
    if (!found.node) throw new ModcError(`cannot find the lm_head of ${logits.name}: ${found.reason}`);
    const head = found.node;
    const h = head.input(0)!;
    const e = new Emitter(g, defaultOpset(model), 'last_logits/', head);
    const mask = g.inputs.find((v) => v.name === 'attention_mask' && !g.initializers.has(v.name));
    const io = mask ? null : decoderIo(model);
    const write = io?.writeIndices ? g.inputs.find((v) => v.name === io.writeIndices!.name) : undefined;
    const nonpad = io?.nonpadKvSeqlen ? g.inputs.find((v) => v.name === io.nonpadKvSeqlen!.name) : undefined;
    const statics = write && nonpad ? { write, nonpad } : null;
    let picked: Value;
    if (mask) {
      // The call's own mask columns are the last S of [B, past + S]. Each row's last real
      // position is the number of positions before it: those whose running count of real
      // tokens is still below the row's total.
      // A caller's 4-D mask gives them on its diagonal at the call's sequence indices (compiler/passes/caller-mask.ts).
      const seq = e.op('Slice', [e.op('Shape', [h]), e.i64([1]), e.i64([2])]);
      const total = e.op('Slice', [e.op('Shape', [mask]), e.i64([1]), e.i64([2])]);
      const columns = callerMask(g) ? callerTokenInputs(model, e, h, mask).tokenMask : e.op('Slice', [mask, e.op('Sub', [total, seq]), total, e.i64([1])]);
      const current = e.cast(columns, DataType.FLOAT);
      const running = e.op('CumSum', [current, e.i64(1)]);
      const real = e.reduceSum(current, [1], true);
      const before = e.cast(e.op('Less', [running, real]), DataType.FLOAT);
      const index = e.cast(e.reduceSum(before, [1], true), DataType.INT64);
      const width = e.op('Concat', [e.i64([1, 1]), e.op('Slice', [e.op('Shape', [h]), e.i64([2]), e.i64([3])])], { axis: 0 });
      picked = e.op('GatherElements', [h, e.op('Expand', [e.unsqueeze(index, [2]), width])], { axis: 1 });
    } else if (statics) {
      // A static cache: the call's real tokens per row are nonpad_kv_seqlen - write_indices
      // (right padding), so the last real position is that count minus one.
      const [write, nonpad] = [statics.write, statics.nonpad].map((v) => e.cast(v, DataType.INT64));
      const index = e.op('Max', [e.op('Sub', [e.op('Sub', [nonpad!, write!]), e.i64(1)]), e.i64(0)]);
      const width = e.op('Concat', [e.i64([1, 1]), e.op('Slice', [e.op('Shape', [h]), e.i64([2]), e.i64([3])])], { axis: 0 });
      picked = e.op('GatherElements', [h, e.op('Expand', [e.unsqueeze(index, [1, 2]), width])], { axis: 1 });
    } else {
      picked = e.op('Slice', [h, e.i64([-1]), e.i64([Number.MAX_SAFE_INTEGER]), e.i64([1])]);
    }
    head.setInput(0, picked);
    logits.type = withSequenceOne(logits.type);
    writeLogitsPositions(model, 'last');
    const from = mask ? 'real position (from attention_mask)' : statics ? `real position (from ${statics.nonpad.name} - ${statics.write.name})` : 'position';
    return { changed: true, notes: [`${head.describe()} reads each row's last ${from}: logits [B, 1, V]`] };
  },
};
