/**
 * What the decoder analysis finds, as types: the residual stream, its steps, the layers they
 * group into, each layer's attention core, KV cache and side inputs, and the global facts.
 *
 * Everything here refers to IR objects (Value, Node) of the analysed model; the structure goes
 * stale as soon as a pass edits the graph, so re-analyse after a transformation.
 */
import type { Node, Value } from '../core/ir/graph.js';

/**
 * 'recurrent': a token mixer with state besides a KV cache and no attention (the linear-attention
 * or convolution layers of hybrid models); its `kv` names that state, its `node` is the first
 * node reading it. Such layers are found and kept dense.
 */
export type AttentionForm = 'unfused' | 'Attention' | 'MultiHeadAttention' | 'GroupQueryAttention' | 'StandardAttention' | 'recurrent';

/**
 * How positions enter the model: learned absolute embeddings added to the stream start;
 * rotary angles computed in the graph (Cos/Sin of position_ids); the com.microsoft
 * RotaryEmbedding op; GroupQueryAttention with do_rotary=1; or nothing at all.
 */
export type PositionalScheme = 'absolute' | 'rotary-graph' | 'rotary-op' | 'rotary-gqa' | 'none';

/**
 * [batch, kv heads, time, head size] per tensor, or ORT's one [2, batch, heads, time, head] tensor;
 * or a static cache (a fixed-size buffer written by TensorScatter at write_indices, opset 24):
 * [batch, max length, kv heads * head size] ('static-BTH') or [batch, kv heads, max length, head size]
 * ('static-BHTD').
 */
export type KvLayout = 'BHTD' | 'combined-2BHTD' | 'static-BTH' | 'static-BHTD';

/** Whether a layout is a static cache (a buffer the layer writes in place). */
export const isStaticLayout = (layout: KvLayout): boolean => layout === 'static-BTH' || layout === 'static-BHTD';

/** The sequence axis of a cache tensor in a layout. */
export const kvSequenceAxis = (layout: KvLayout): number => (layout === 'combined-2BHTD' ? 3 : layout === 'static-BTH' ? 1 : 2);

export type FloatType = 'float32' | 'float16' | 'bfloat16';

/** One cache tensor: the graph input holding the past and the graph output holding the present. */
export interface KvTensor {
  input: Value;
  output: Value;
}

/**
 * A layer's KV cache. For 'combined-2BHTD' key and value are the same tensors (slot 0 of the
 * leading axis is the key, slot 1 the value).
 */
export interface KvCacheSpec {
  key: KvTensor;
  value: KvTensor;
  layout: KvLayout;
  numKvHeads: number;
  headSize: number;
  /** Static layouts: the TensorScatter nodes writing the key and value buffers. */
  writes?: { key: Node; value: Node };
}

/** The attention of one layer: the fused op, or the Q·K^T MatMul, Softmax and P·V MatMul. */
export type AttentionCore =
  | { form: 'unfused'; scores: Node; softmax: Node; context: Node; numHeads: number; kv: KvCacheSpec }
  | { form: Exclude<AttentionForm, 'unfused'>; node: Node; numHeads: number; kv: KvCacheSpec };

/** The ops that fuse a residual add (or the embedding) with the following norm. */
export type FusedBoundaryOp = 'EmbedLayerNormalization' | 'SkipLayerNormalization' | 'SkipSimplifiedLayerNormalization';

/**
 * A fused node that spans a layer boundary: it computes the residual sum that ends one layer
 * (or starts the stream) and the normalised copy the next layer (or lm_head) reads.
 */
export interface FusedBoundary {
  node: Node;
  op: FusedBoundaryOp;
  /** The residual sum (EmbedLayerNormalization: the stream start); null when the op does not output it. */
  sum: Value | null;
  /** The normalised copy of the sum (output 0). */
  normed: Value;
  /** The layer whose residual add this node performs; -1 for the embedding (EmbedLayerNormalization, or a skip-norm summing the embedding terms). */
  addsForLayer: number;
  /** The layer reading `normed`; equal to the layer count when it is the final norm before lm_head. */
  normedForLayer: number;
  /** A skip-norm starting the stream (it sums the embedding terms): the input slot (0 or 1) of the token embedding. */
  streamOperandIndex?: number;
}

/** Why the branch of a step counts as computed from a normalised copy of the stream. */
export type NormEvidence =
  { kind: 'op'; node: Node; of: Value } | { kind: 'decomposed'; node: Node; of: Value } | { kind: 'fused'; node: Node; of: Value | null };

/**
 * One residual step: `sum = stream + branch`, an Add or a fused skip-norm whose input 0/1 are
 * the two operands (the stream operand is found by dataflow, not by slot).
 */
export interface StreamStep {
  node: Node;
  kind: 'Add' | 'SkipLayerNormalization' | 'SkipSimplifiedLayerNormalization';
  streamIn: Value;
  streamOperandIndex: number;
  branchOperandIndex: number;
  branch: Value;
  /** The step's sum output, or null when a fused op does not output the sum. */
  sum: Value | null;
  /**
   * Value-preserving nodes the stream passes through after the sum (an Identity, or a Cast to the
   * sum's own element type, as torch writes between residual adds), in order; usually none.
   */
  carry: Node[];
  /** The new stream value: `sum`, or the output of the last `carry` node. */
  carried: Value | null;
  /** How the branch normalises its input; null for a branch that reads the stream with no norm. */
  norm: NormEvidence | null;
  /** The stream value of this layer the branch is computed from: the one its norm normalises, or the one it reads. */
  input: Value;
  /** Nodes computing the branch (between the stream and this step), in graph order. */
  branchNodes: Node[];
  attention: AttentionCore | null;
  layer: number;
}

/** Where a layer's residual add happens: needed when the sum is not a value in the graph. */
export interface ExitSite {
  node: Node;
  streamOperandIndex: number;
  branchOperandIndex: number;
}

/** The role of a sequence-length scalar. */
export type SequenceLengthRole = 'seqlens_k' | 'total_sequence_length' | 'past_sequence_length' | 'shape-derived' | 'write_indices' | 'nonpad_kv_seqlen';

/**
 * A value a layer reads that it does not compute. Axes are for the value as the layer reads it
 * (null when the analysis cannot tell); "per-token" values have one entry per query token and
 * must be gathered with the tokens when a layer runs on a subset of them.
 */
export type SideInput =
  | { kind: 'weight'; value: Value }
  | { kind: 'past-kv'; value: Value; role: 'key' | 'value' | 'key-and-value' }
  | {
      kind: 'per-token';
      value: Value;
      role: 'positions' | 'rotary-cos' | 'rotary-sin' | 'rotary-angles' | 'other';
      batchAxis: number | null;
      sequenceAxis: number | null;
    }
  | {
      kind: 'attention-mask';
      value: Value;
      /**
       * 'caller-4d': computed from the caller's 4-D attention_mask [B, 1, M, M], whose query and key
       * axes count sequence indices (every token fed so far, padding included), not cache slots.
       */
      form: MaskForm;
      queryAxis: number | null;
      keyAxis: number | null;
    }
  | { kind: 'sequence-length'; value: Value; role: SequenceLengthRole }
  | { kind: 'other'; value: Value; reason: string };

export type SideInputKind = SideInput['kind'];

/** How a layer reads the attention mask (see SideInput 'attention-mask'). */
export type MaskForm = 'raw-2d' | 'additive-bias' | 'key-padding' | 'caller-4d';

export interface LayerInfo {
  index: number;
  residualIn: Value;
  /** The stream after this layer; null when a fused op adds it without outputting it (see `exit`). */
  residualOut: Value | null;
  exit: ExitSite;
  steps: StreamStep[];
  /**
   * Nodes of this layer in graph order: every node downstream of `residualIn` (or of the entry
   * boundary's normed output) up to and including the exit step. Constant-only producers
   * (Constant nodes, casts of initializers) are not listed: they are side inputs of kind 'weight'.
   * A fused exit boundary node is listed here (it performs this layer's add).
   */
  nodes: Node[];
  /** The fused node producing this layer's residualIn and normed input (not in `nodes`). */
  entryBoundary: FusedBoundary | null;
  /** The fused node performing this layer's last add (in `nodes`). */
  exitBoundary: FusedBoundary | null;
  attention: AttentionCore;
  /** Nodes that neither feed nor follow the attention core: the MLP sub-block with its norm. */
  mlpNodes: Node[];
  sideInputs: SideInput[];
  kv: KvCacheSpec;
  /**
   * State besides the KV cache this layer reads and rewrites (conv / recurrent state of hybrid
   * models: a past graph input and its present graph output). A layer with state is not routed.
   */
  state: KvTensor[];
}

/** The stream start: a token Gather (plus absolute position adds), or EmbedLayerNormalization. */
export interface EmbeddingInfo {
  /** The stream start value (the sum of the embeddings). */
  output: Value;
  /**
   * The token table [V, H]; for a decoder fed by `inputs_embeds` (the embedding lives in another
   * model) that graph input [B, S, H] itself, which is then also `output`.
   */
  table: Value;
  /** The position table when positions are added to the embedding. */
  positionTable: Value | null;
  boundary: FusedBoundary | null;
}

export interface FinalInfo {
  /** The last stream value; null when the last layer's add is fused into the final norm. */
  residual: Value | null;
  /** The final norm node (the fused exit boundary when `residual` is null), if recognised. */
  norm: Node | null;
  /** The model's output: logits, or (kind 'hidden') the hidden states. */
  logits: Value;
  /**
   * 'logits' when a vocabulary projection (a MatMul/Gemm-like op with a constant weight) lies
   * between the end of the stream and the output; 'hidden' when none does (the output is the
   * final norm's, a decoder whose lm_head lives elsewhere).
   */
  kind: 'logits' | 'hidden';
}

/** How the attention mask reaches the layers, and the shared nodes that build it. */
export interface MaskInfo {
  form: MaskForm | 'seqlens' | 'none';
  /** Graph inputs the mask is built from (typically attention_mask). */
  inputs: Value[];
  /** Values the layers read (the bias, the raw mask, seqlens_k and total_sequence_length). */
  outputs: Value[];
  /** Prefix nodes computing `outputs` (shared by all layers; constant-only nodes left out), in graph order. */
  nodes: Node[];
}

export interface Explanation {
  /** What was considered: a node or value, as `describe()`/`%name` text. */
  subject: string;
  verdict: 'accepted' | 'rejected' | 'note';
  reason: string;
  layer?: number;
}

export interface DecoderStructure {
  embedding: EmbeddingInfo;
  steps: StreamStep[];
  layers: LayerInfo[];
  final: FinalInfo;
  /** Non-constant nodes before the stream or beside it (mask, positions, rotary tables). */
  prefixNodes: Node[];
  /** Nodes after the last layer (final norm, lm_head). */
  suffixNodes: Node[];
  hiddenSize: number;
  numHeads: number;
  numKvHeads: number;
  headSize: number;
  dtype: FloatType;
  positional: PositionalScheme;
  mask: MaskInfo;
  explain: Explanation[];
}
