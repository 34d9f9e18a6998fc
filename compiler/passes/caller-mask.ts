/**
 * Routing a model that takes the caller's 4-D attention mask `attention_mask` [B, 1, M, M]
 * (Megatron GPT-2 exports): entry [b, 0, i, j] says whether the token at sequence index i may
 * attend the token at sequence index j, where a sequence index counts every token fed so far,
 * padding included. The model slices each call's rows and columns itself.
 *
 * Nothing in such a model says how many tokens came before this call once the caches are
 * compacted (the mask has a fixed size; a compacted cache is shorter), so the compiled model
 * takes it: `past_sequence_length` (int64 [B], the same in every row; 0 for a prefill), and gives
 * `present_sequence_length` = past + S. Then, with P that length:
 *
 *   token mask (routers)   = m[b, 0, P + s, P + s]: a token that may not attend itself is padding
 *   seq_new                = P + indices                                     [B, K]
 *   seq                    = Concat(past_sequence_indices.l, seq_new)         [B, P_l + K]: each key
 *                            slot's sequence index, as the layer lays out its keys
 *   attention_mask (layer) = GatherMask(m, seq, seq, keys, 0)                 [B, 1, P_l + K, P_l + K]
 *                            (keys: the layer's valid slots, compiler/passes/layer-cache.ts)
 *   present_sequence_indices.l = seq, laid out like the layer's present
 *
 * so the layer's own Slice of rows [P_l, P_l + K) and columns [0, P_l + K) picks, for each
 * selected token and each key it holds, the caller's entry at their original sequence indices.
 */
import { ModcError } from '../core/errors.js';
import { DataType } from '../core/ir/dtype.js';
import { Value, type Graph } from '../core/ir/graph.js';
import type { Model } from '../core/ir/model.js';
import { Tensor } from '../core/ir/tensor.js';
import type { TypeProto } from '../core/proto/index.js';
import { PAST_SEQUENCE_LENGTH, PRESENT_SEQUENCE_LENGTH } from '../metadata/decoder-io.js';
import type { Emitter } from './modc-ops/emitter.js';

const int64Type = (dims: string[]): TypeProto =>
  ({ tensor_type: { elem_type: DataType.INT64, shape: { dim: dims.map((d) => ({ dim_param: d })) } } }) as TypeProto;

/** The caller's 4-D attention mask input, or null when the model takes a 2-D one (or none). */
export function callerMask(graph: Graph): Value | null {
  const mask = graph.inputs.find((v) => v.name === 'attention_mask');
  return mask && mask.shape?.length === 4 ? mask : null;
}

/**
 * The `past_sequence_length` input [B] (added once, with the `present_sequence_length` output
 * = past + the call's tokens).
 */
export function sequenceLengthInput(model: Model, e: Emitter): Value {
  const g = model.graph;
  const found = g.inputs.find((v) => v.name === PAST_SEQUENCE_LENGTH);
  if (found) return found;
  const tokens = g.inputs.find((v) => v.name === 'input_ids') ?? g.inputs.find((v) => v.name === 'inputs_embeds');
  if (!tokens) throw new ModcError("routing needs the 'input_ids' (or 'inputs_embeds') input");
  if (g.findValue(PAST_SEQUENCE_LENGTH) || g.findValue(PRESENT_SEQUENCE_LENGTH))
    throw new ModcError(
      `the model already has a value named ${PAST_SEQUENCE_LENGTH} or ${PRESENT_SEQUENCE_LENGTH}, which a compiled model reading a caller's 4-D mask takes and gives`,
    );
  const past = g.addInput(new Value(PAST_SEQUENCE_LENGTH, int64Type(['batch'])));
  const present = e.op('Add', [past, e.dimScalar(tokens, 1)]);
  present.name = g.uniqueName(PRESENT_SEQUENCE_LENGTH);
  present.type = int64Type(['batch']);
  g.outputs.push(present);
  return past;
}

/**
 * The routers' inputs from a caller's mask: this call's token mask [B, S] (int64, the mask's
 * diagonal at the call's sequence indices: a token that may not attend itself is padding) and
 * the past length (a scalar, for top-k's one-token rule).
 */
export function callerTokenInputs(model: Model, e: Emitter, tokens: Value, mask: Value): { tokenMask: Value; pastLength: Value } {
  const past = sequenceLengthInput(model, e);
  const seq = e.op('Add', [e.unsqueeze(past, [1]), e.unsqueeze(e.op('Range', [e.i64(0), e.dimScalar(tokens, 1), e.i64(1)]), [0])]);
  const size = e.dimScalar(mask, 3);
  const flat = e.op('Reshape', [mask, e.i64([0, -1])]);
  const diagonal = e.op('GatherElements', [flat, e.op('Mul', [seq, e.op('Add', [size, e.i64(1)])])], { axis: 1 });
  const tokenMask = e.cast(e.cast(diagonal, DataType.BOOL), DataType.INT64);
  return { tokenMask, pastLength: e.reduceMax(past, [0], false) };
}

/** A zero scalar of the mask's element type: GatherMask's fill for keys a layer does not hold. */
export function maskFill(e: Emitter, mask: Value): Value {
  const dtype = mask.dtype ?? DataType.FLOAT;
  if (dtype === DataType.BOOL) return e.constant(Tensor.fromArray('', [], Uint8Array.of(0), DataType.BOOL));
  if (dtype === DataType.INT64) return e.i64(0);
  if (dtype === DataType.INT32) return e.constant(Tensor.fromArray('', [], Int32Array.of(0)));
  return e.scalar(0, dtype);
}
