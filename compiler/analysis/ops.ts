/**
 * The op vocabulary the decoder analysis understands, as tables: fused attention ops and the
 * meaning of their input/output slots, norm ops, and fused residual+norm ops.
 */
import type { Node } from '../core/ir/graph.js';
import type { AttentionForm, FusedBoundaryOp, SequenceLengthRole } from './types.js';

export const MS_DOMAIN = 'com.microsoft';

export const isDefaultDomain = (n: Node) => n.domain === '' || n.domain === 'ai.onnx';

/** Whether the node is op `type` in the default domain or com.microsoft (ORT accepts both for some ops). */
export function isOp(n: Node, type: string): boolean {
  return n.opType === type && (isDefaultDomain(n) || n.domain === MS_DOMAIN);
}

/** What a slot of a fused attention op means. */
export type AttentionSlot =
  | { role: 'past-key' | 'past-value' | 'past-combined' }
  | { role: 'mask'; form: 'raw-2d' | 'additive-bias' | 'key-padding' }
  | { role: 'sequence-length'; length: SequenceLengthRole }
  | { role: 'positions' }
  | { role: 'rotary-cache'; which: 'cos' | 'sin' };

export interface FusedAttentionSchema {
  form: Exclude<AttentionForm, 'unfused'>;
  inputs: Record<number, AttentionSlot>;
  presentKey: number;
  /** Output slot of the present value; equal to presentKey for the combined layout. */
  presentValue: number;
}

/** Slots from ONNX Runtime's contrib op schemas (docs/ContribOperators.md). */
export const FUSED_ATTENTION: Record<string, FusedAttentionSchema> = {
  Attention: {
    form: 'Attention',
    inputs: {
      3: { role: 'mask', form: 'raw-2d' },
      4: { role: 'past-combined' },
      5: { role: 'mask', form: 'additive-bias' },
      6: { role: 'sequence-length', length: 'past_sequence_length' },
    },
    presentKey: 1,
    presentValue: 1,
  },
  MultiHeadAttention: {
    form: 'MultiHeadAttention',
    inputs: {
      4: { role: 'mask', form: 'key-padding' },
      5: { role: 'mask', form: 'additive-bias' },
      6: { role: 'past-key' },
      7: { role: 'past-value' },
      8: { role: 'sequence-length', length: 'past_sequence_length' },
    },
    presentKey: 1,
    presentValue: 2,
  },
  GroupQueryAttention: {
    form: 'GroupQueryAttention',
    inputs: {
      3: { role: 'past-key' },
      4: { role: 'past-value' },
      5: { role: 'sequence-length', length: 'seqlens_k' },
      6: { role: 'sequence-length', length: 'total_sequence_length' },
      7: { role: 'rotary-cache', which: 'cos' },
      8: { role: 'rotary-cache', which: 'sin' },
      9: { role: 'positions' },
      10: { role: 'mask', form: 'additive-bias' },
    },
    presentKey: 1,
    presentValue: 2,
  },
};

/** RotaryEmbedding (com.microsoft): input, position_ids, cos_cache, sin_cache. */
export const ROTARY_SLOTS: Record<number, AttentionSlot> = {
  1: { role: 'positions' },
  2: { role: 'rotary-cache', which: 'cos' },
  3: { role: 'rotary-cache', which: 'sin' },
};

/**
 * The standard ONNX Attention (opset 23/24): Q, K, V, attn_mask, past_key, past_value,
 * nonpad_kv_seqlen (24) -> Y, present_key, present_value. With a static cache K and V are the
 * whole buffers TensorScatter wrote, and nonpad_kv_seqlen counts each row's valid keys.
 */
export const STANDARD_ATTENTION: FusedAttentionSchema = {
  form: 'StandardAttention',
  inputs: {
    3: { role: 'mask', form: 'additive-bias' },
    4: { role: 'past-key' },
    5: { role: 'past-value' },
    6: { role: 'sequence-length', length: 'nonpad_kv_seqlen' },
  },
  presentKey: 1,
  presentValue: 2,
};

export const isStandardAttention = (n: Node) => n.opType === 'Attention' && isDefaultDomain(n);
export const isTensorScatter = (n: Node) => n.opType === 'TensorScatter' && isDefaultDomain(n);
export const isStandardRotary = (n: Node) => n.opType === 'RotaryEmbedding' && isDefaultDomain(n);

export function fusedAttentionSchema(n: Node): FusedAttentionSchema | undefined {
  if (isStandardAttention(n)) return STANDARD_ATTENTION;
  return n.domain === MS_DOMAIN ? FUSED_ATTENTION[n.opType] : undefined;
}

/**
 * Slots of the other standard ops a layer reads side inputs at: TensorScatter's write_indices
 * (input 2) and RotaryEmbedding-23's position_ids (input 3; its cos/sin caches are weights, or
 * per-token values when it takes no position_ids).
 */
export function standardSlot(n: Node, index: number): AttentionSlot | undefined {
  if (isTensorScatter(n) && index === 2) return { role: 'sequence-length', length: 'write_indices' };
  if (isStandardRotary(n) && index === 3) return { role: 'positions' };
  return undefined;
}

export const isRotaryOp = (n: Node) => n.domain === MS_DOMAIN && n.opType === 'RotaryEmbedding';

/** Norm ops whose output 0 is a normalised copy of input 0. */
export const NORM_OPS = new Set(['LayerNormalization', 'SimplifiedLayerNormalization', 'RMSNormalization']);

export const isNormOp = (n: Node) => NORM_OPS.has(n.opType) && (isDefaultDomain(n) || n.domain === MS_DOMAIN);

/** Fused residual-add + norm ops: inputs 0 and 1 are summed, output 0 is the norm, output 3 the sum. */
export const SKIP_NORM_OPS = new Set<FusedBoundaryOp>(['SkipLayerNormalization', 'SkipSimplifiedLayerNormalization']);

export function skipNormOp(n: Node): 'SkipLayerNormalization' | 'SkipSimplifiedLayerNormalization' | undefined {
  if (n.domain !== MS_DOMAIN) return undefined;
  return n.opType === 'SkipLayerNormalization' || n.opType === 'SkipSimplifiedLayerNormalization' ? n.opType : undefined;
}

export const isEmbedLayerNorm = (n: Node) => n.domain === MS_DOMAIN && n.opType === 'EmbedLayerNormalization';

/** Output slot of the residual sum in SkipLayerNormalization / SkipSimplifiedLayerNormalization. */
export const SKIP_SUM_OUTPUT = 3;
/** Output slot of the embedding sum in EmbedLayerNormalization. */
export const EMBED_SUM_OUTPUT = 2;

/** Ops between the score MatMul and Softmax, or between Softmax and the context MatMul. */
export const SCORE_PASS_THROUGH = new Set(['Cast', 'Add', 'Div', 'Mul', 'Sub', 'Where', 'Reshape', 'Slice', 'Identity', 'Dropout', 'Min', 'Max', 'Tanh']);
