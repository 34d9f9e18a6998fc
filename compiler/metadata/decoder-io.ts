/**
 * The I/O contract of a decoder model, original or compiled, as seen by a caller driving it:
 * which input takes the token ids, the attention mask, the positions; which past/present
 * tensors form each layer's KV cache (and its layout); and, for modc-compiled layers, the
 * per-layer cache lengths or slot validity. Read from the graph's inputs and outputs only.
 */
import { ModcError, UsageError } from '../core/errors.js';
import { DataType } from '../core/ir/dtype.js';
import type { Value } from '../core/ir/graph.js';
import type { Model } from '../core/ir/model.js';
import { GraphFacts } from '../analysis/graph-facts.js';
import { trackAxes } from '../analysis/token-axes.js';

/** See compiler/analysis/types.ts: the static layouts are fixed-size buffers written by TensorScatter. */
export type KvLayout = 'BHTD' | 'combined-2BHTD' | 'static-BTH' | 'static-BHTD';

export interface KvBinding {
  layer: number;
  /** Past input and present output names; for the combined layout key and value share one tensor. */
  pastKey: string;
  pastValue: string | null;
  presentKey: string;
  presentValue: string | null;
  layout: KvLayout;
  numHeads: number;
  headSize: number;
  dtype: 'float32' | 'float16';
  /**
   * modc-compiled GroupQueryAttention or static-cache layer: the per-row cache length input and
   * output (each row's valid slots first).
   */
  pastLength: string | null;
  presentLength: string | null;
  /**
   * modc-compiled layer of the other forms: which cache slots hold a token, bool [B, P_l] in and
   * [B, P_l + K] out, carried like the cache (a row's slots may have holes at batch > 1).
   */
  pastValid: string | null;
  presentValid: string | null;
  /** Static layouts: the buffer length when the model fixes it (null: the runner chooses). */
  maxLength: number | null;
  /**
   * modc-compiled layer whose cache slots carry an index, int64 [B, P_l] in and out (zero-wide at
   * the start), carried like the cache: a sliding-window layer's original position of each slot
   * (`past_positions.l`), or, in a model reading the caller's 4-D mask, each slot's sequence index
   * (`past_sequence_indices.l`). Beside a static cache, a sliding-window layer's positions are a
   * buffer like it, [B, max length] (zeros at the start), written at past_lengths.l.
   */
  pastPositions: string | null;
  presentPositions: string | null;
}

/** A static cache's buffer dims for a batch of `B` and a buffer of `length` slots. */
export function staticCacheDims(b: KvBinding, B: number, length: number): number[] {
  return b.layout === 'static-BTH' ? [B, length, b.numHeads * b.headSize] : [B, b.numHeads, length, b.headSize];
}

/**
 * State besides the KV cache (hybrid models: `past_key_values.N.conv_state` / `recurrent_state`
 * -> `present.N.*`): zeros at the start, the present fed back as the past at every step.
 */
export interface StateBinding {
  /**
   * The layer the names number (`past_key_values.N.*`): a label only. The analysis binds state to
   * a layer by dataflow; state may be read and written by the prefix or the suffix instead.
   */
  layer: number;
  past: string;
  present: string;
  /** Dims with the batch axis (0) as -1; every other dim is static. */
  dims: number[];
  dtype: 'float32' | 'float16';
}

export interface DecoderIo {
  /** The token ids input (for an inputs_embeds decoder: the ids its embedding model takes, int64). */
  inputIds: { name: string; dtype: 'int32' | 'int64' };
  /** Set when the decoder is fed embeddings [B, S, H] instead of ids (see runtime/embeddings.ts). */
  inputsEmbeds: { name: string; hiddenSize: number; dtype: 'float32' | 'float16' } | null;
  /**
   * `dtype`: of a 2-D [B, T] mask. `caller4d`: the model takes the caller's 4-D mask [B, 1, M, M]
   * instead, in sequence-index coordinates (1 or true = attend; the model slices each call's rows
   * and columns): its element type and M (null when the model leaves it open).
   */
  attentionMask: { name: string; dtype: 'int32' | 'int64'; caller4d: { size: number | null; dtype: MaskElement } | null } | null;
  /**
   * A compiled model reading the caller's 4-D mask: the input taking each row's sequence length
   * before this call (int64 [B], every token fed so far, padding included; 0 for a prefill), and
   * the output giving it after the call.
   */
  sequenceLength: { past: string; present: string | null } | null;
  positionIds: { name: string; dtype: 'int32' | 'int64' } | null;
  logits: string;
  kv: KvBinding[];
  state: StateBinding[];
  vocabSize: number | null;
  /** Positions the model has tables for (learned embeddings, rotary caches); null when unbounded. */
  maxPositions: number | null;
  /**
   * The padding sides the model's attention gives meaningful outputs for, the default first.
   * GroupQueryAttention reads per-row valid lengths (seqlens_k), i.e. right padding only; so does a
   * static KV cache (each row's keys are the first nonpad_kv_seqlen slots of its buffer).
   */
  paddingSides: PadSide[];
  /** Why only right padding (the op that reads per-row valid lengths); null when both sides work. */
  rightPaddingOnly: string | null;
  /**
   * Static KV caches (TensorScatter, opset 24): the write index input [B] (each row's real tokens
   * before this call) and the valid-key count input [B] (after it: write index + the call's real
   * tokens); null when the model has none.
   */
  writeIndices: { name: string; dtype: 'int32' | 'int64' } | null;
  nonpadKvSeqlen: { name: string; dtype: 'int32' | 'int64' } | null;
  /** Slots a runner allocates per static buffer whose length the model leaves open. */
  staticCacheLength: number | null;
  /**
   * Why the model cannot take padding at all (rows must have one length), or null. A static-cache
   * Attention with is_causal=1 and no attn_mask aligns causality on nonpad_kv_seqlen minus the
   * call's length, which a shorter (padded) row breaks.
   */
  unpaddable: string | null;
  /**
   * Why the model runs one row per call only, or null: an export whose mask puts attention_mask's
   * batch axis on another axis of the mask an attention op reads (mobius's dynamic-cache GPT-2:
   * Unsqueeze(attention_mask, 0) -> [1, B, T], expanded to [B, S, T], so the rows land on the
   * query axis). ONNX Runtime refuses B > 1 there unless B equals S, and then mixes rows.
   */
  batchOne: string | null;
}

/** Metadata a compile writes when its original runs one row per call (DecoderIo.batchOne): the reason. */
export const BATCH_ONE_KEY = 'modc.batch_one';

/** Metadata a compile writes when it opens a static buffer's length: the original's length. */
export const STATIC_CACHE_LENGTH_KEY = 'modc.static_cache_length';

/** Metadata a compile writes with the names of the model's write index and valid-key inputs (JSON). */
export const STATIC_CACHE_INPUTS_KEY = 'modc.static_cache_inputs';

/** Static caches a runner allocates this many slots for when neither the model nor its positions say. */
export const DEFAULT_STATIC_CACHE_LENGTH = 2048;

export type PadSide = 'left' | 'right';

/** Element types a caller's 4-D attention mask can have. */
export type MaskElement = 'float32' | 'float16' | 'bool' | 'int32' | 'int64';

const MASK_ELEMENTS: Partial<Record<number, MaskElement>> = {
  [DataType.FLOAT]: 'float32',
  [DataType.FLOAT16]: 'float16',
  [DataType.BOOL]: 'bool',
  [DataType.INT32]: 'int32',
  [DataType.INT64]: 'int64',
};

export const PAST_SEQUENCE_LENGTH = 'past_sequence_length';
export const PRESENT_SEQUENCE_LENGTH = 'present_sequence_length';

const intType = (v: Value): 'int32' | 'int64' => (v.dtype === DataType.INT32 ? 'int32' : 'int64');

/** Past/present naming conventions: HF/GenAI `past_key_values.N.key` and ORT's `past_N` combined. */
const PAST_SPLIT = /^past_key_values\.(\d+)\.(key|value)$/;
const PAST_COMBINED = /^past_(\d+)$/;
const PAST_STATE = /^past_key_values\.(\d+)\.(\w+)$/;
/** Static caches as onnxruntime/mobius names them: `key_cache.N` -> `updated_key_cache.N`. */
const PAST_STATIC = /^(key|value)_cache\.(\d+)$/;
export const pastLengthName = (layer: number) => `past_lengths.${layer}`;
export const presentLengthName = (layer: number) => `present_lengths.${layer}`;
export const pastValidName = (layer: number) => `past_valid.${layer}`;
export const presentValidName = (layer: number) => `present_valid.${layer}`;
export const pastPositionsName = (layer: number) => `past_positions.${layer}`;
export const presentPositionsName = (layer: number) => `present_positions.${layer}`;
export const pastSequenceIndicesName = (layer: number) => `past_sequence_indices.${layer}`;
export const presentSequenceIndicesName = (layer: number) => `present_sequence_indices.${layer}`;

export function decoderIo(model: Model): DecoderIo {
  const g = model.graph;
  const inputs = new Map(g.inputs.filter((v) => !g.initializers.has(v.name)).map((v) => [v.name, v]));
  const outputs = new Map(g.outputs.map((v) => [v.name, v]));
  const ids = inputs.get('input_ids');
  const embeds = ids ? undefined : inputs.get('inputs_embeds');
  if (!ids && !embeds) throw new ModcError(`model has no 'input_ids' input (inputs: ${[...inputs.keys()].join(', ')}), nor 'inputs_embeds'`);
  const hidden = embeds?.shape?.[2];
  if (embeds && typeof hidden !== 'number') throw new ModcError(`inputs_embeds needs a static hidden size (dims [${(embeds.shape ?? []).join(', ')}])`);
  const logits = outputs.get('logits') ?? g.outputs[0];
  if (!logits) throw new ModcError('model has no outputs');
  const mask = inputs.get('attention_mask');
  const pos = inputs.get('position_ids');

  const kv = new Map<number, KvBinding>();
  const state: StateBinding[] = [];
  const statics = staticCaches(model);
  for (const v of inputs.values()) {
    const mobius = PAST_STATIC.exec(v.name);
    if (mobius) {
      const layer = Number(mobius[2]);
      const kind = mobius[1] as 'key' | 'value';
      const entry = kv.get(layer) ?? emptyBinding(layer, v, inputs, outputs);
      const layout = statics.get(v);
      if (!layout) throw new ModcError(`input ${v.name} is named like a static cache but no TensorScatter writes it`);
      Object.assign(entry, staticShape(v, layout));
      if (kind === 'key') [entry.pastKey, entry.presentKey] = [v.name, pick(outputs, [`updated_key_cache.${layer}`, `present.${layer}.key`], v.name)];
      else [entry.pastValue, entry.presentValue] = [v.name, pick(outputs, [`updated_value_cache.${layer}`, `present.${layer}.value`], v.name)];
      kv.set(layer, entry);
      continue;
    }
    const extra = PAST_SPLIT.test(v.name) ? null : PAST_STATE.exec(v.name);
    if (extra) {
      state.push(stateBinding(v, Number(extra[1]), pick(outputs, [`present.${extra[1]}.${extra[2]}`, `present_key_values.${extra[1]}.${extra[2]}`], v.name)));
      continue;
    }
    const split = PAST_SPLIT.exec(v.name);
    const combined = PAST_COMBINED.exec(v.name);
    if (!split && !combined) continue;
    const layer = Number((split ?? combined)![1]);
    const shape = v.shape ?? [];
    const [heads, head] = combined ? [shape[2], shape[4]] : [shape[1], shape[3]];
    const entry =
      kv.get(layer) ??
      ({
        layer,
        pastKey: '',
        pastValue: null,
        presentKey: '',
        presentValue: null,
        layout: combined ? 'combined-2BHTD' : 'BHTD',
        numHeads: typeof heads === 'number' ? heads : 0,
        headSize: typeof head === 'number' ? head : 0,
        dtype: v.dtype === DataType.FLOAT16 ? 'float16' : 'float32',
        pastLength: inputs.has(pastLengthName(layer)) ? pastLengthName(layer) : null,
        presentLength: outputs.has(presentLengthName(layer)) ? presentLengthName(layer) : null,
        pastValid: inputs.has(pastValidName(layer)) ? pastValidName(layer) : null,
        presentValid: outputs.has(presentValidName(layer)) ? presentValidName(layer) : null,
        maxLength: null,
        ...slotIndices(layer, inputs, outputs),
      } satisfies KvBinding);
    if (combined) {
      entry.pastKey = v.name;
      entry.presentKey = pick(outputs, [`present_${layer}`], v.name);
    } else if (split![2] === 'key') {
      entry.pastKey = v.name;
      entry.presentKey = pick(outputs, [`present.${layer}.key`, `present_key_values.${layer}.key`], v.name);
    } else {
      entry.pastValue = v.name;
      entry.presentValue = pick(outputs, [`present.${layer}.value`, `present_key_values.${layer}.value`], v.name);
    }
    const layout = statics.get(v);
    if (layout) Object.assign(entry, staticShape(v, layout));
    kv.set(layer, entry);
  }
  const layers = [...kv.values()].sort((a, b) => a.layer - b.layer);
  for (const b of layers) {
    if (!b.numHeads || !b.headSize) throw new ModcError(`past input ${b.pastKey} needs static head count and head size dims`);
  }
  const vocab = logits.shape?.at(-1);
  const writes = staticLengthInputs(model, inputs);
  const staticLengths = layers.filter((b) => b.layout.startsWith('static')).map((b) => b.maxLength);
  const caller4d = mask && mask.shape?.length === 4 ? callerMask(mask) : null;
  const tables = maxPositions(model, pos ?? null);
  // The caller's mask covers M sequence indices: no context can be longer.
  const positions = caller4d?.size ? Math.min(tables ?? caller4d.size, caller4d.size) : tables;
  const lengthBased =
    lengthBasedAttention(model) ??
    (staticLengths.length ? "a static KV cache (TensorScatter) reads each row's valid keys (nonpad_kv_seqlen) from the start of its buffer" : null);
  return {
    inputIds: ids ? { name: ids.name, dtype: intType(ids) } : { name: 'input_ids', dtype: 'int64' },
    inputsEmbeds: embeds ? { name: embeds.name, hiddenSize: hidden as number, dtype: embeds.dtype === DataType.FLOAT16 ? 'float16' : 'float32' } : null,
    attentionMask: mask ? { name: mask.name, dtype: intType(mask), caller4d } : null,
    sequenceLength: inputs.has(PAST_SEQUENCE_LENGTH)
      ? { past: PAST_SEQUENCE_LENGTH, present: outputs.has(PRESENT_SEQUENCE_LENGTH) ? PRESENT_SEQUENCE_LENGTH : null }
      : null,
    positionIds: pos ? { name: pos.name, dtype: intType(pos) } : null,
    logits: logits.name,
    kv: layers,
    state,
    vocabSize: typeof vocab === 'number' ? vocab : null,
    maxPositions: positions,
    paddingSides: lengthBased ? ['right'] : ['left', 'right'],
    rightPaddingOnly: lengthBased,
    writeIndices: writes.write,
    nonpadKvSeqlen: writes.nonpad,
    unpaddable: unpaddable(model),
    batchOne: batchOne(model),
    staticCacheLength: staticLengths.length
      ? Math.max(0, ...staticLengths.map((n) => n ?? 0), recordedLength(model)) || positions || DEFAULT_STATIC_CACHE_LENGTH
      : null,
  };
}

/** A caller's [B, 1, M, M] attention mask: its element type and M. */
function callerMask(mask: Value): { size: number | null; dtype: MaskElement } {
  const dtype = MASK_ELEMENTS[mask.dtype ?? DataType.FLOAT];
  if (!dtype)
    throw new ModcError(`input ${mask.name} is a 4-D attention mask of element type ${mask.dtype}; modc builds float, float16, bool or integer masks`);
  const m = mask.shape![3];
  return { size: typeof m === 'number' ? m : null, dtype };
}

/** A layer's per-slot index state (sliding-window positions, or sequence indices for a caller's 4-D mask). */
function slotIndices(layer: number, inputs: Map<string, Value>, outputs: Map<string, Value>): Pick<KvBinding, 'pastPositions' | 'presentPositions'> {
  for (const [past, present] of [
    [pastPositionsName(layer), presentPositionsName(layer)],
    [pastSequenceIndicesName(layer), presentSequenceIndicesName(layer)],
  ])
    if (inputs.has(past!)) return { pastPositions: past!, presentPositions: outputs.has(present!) ? present! : null };
  return { pastPositions: null, presentPositions: null };
}

function unpaddable(model: Model): string | null {
  for (const n of model.graph.nodes) {
    if (n.opType !== 'Attention' || (n.domain !== '' && n.domain !== 'ai.onnx') || n.input(3) || n.attrInt('is_causal', 0) !== 1) continue;
    if (n.input(6) && n.input(1)?.producer?.opType === 'TensorScatter')
      return `${n.describe()} is causal by is_causal=1 aligned on nonpad_kv_seqlen, with no attn_mask to mask padding`;
    if (n.input(4)) return `${n.describe()} is causal by is_causal=1, with no attn_mask to mask padding`;
  }
  return null;
}

/** The inputs of attention ops that take a mask or bias, by op (domain::type). */
const MASK_INPUTS: Record<string, number[]> = {
  '::Attention': [3],
  'com.microsoft::Attention': [3, 5],
  'com.microsoft::MultiHeadAttention': [4, 5],
  'com.microsoft::GroupQueryAttention': [10],
};

/** Keeps a batch-1-only original's reason in the compiled model (its masks may no longer show it). */
export function recordBatchOne(model: Model, reason: string | null): void {
  model.metadataProps = model.metadataProps.filter((p) => p.key !== BATCH_ONE_KEY);
  if (reason) model.metadataProps.push({ key: BATCH_ONE_KEY, value: reason });
}

/** See DecoderIo.batchOne; a compiled model keeps its original's verdict in its metadata. */
export function batchOne(model: Model): string | null {
  const recorded = model.metadataProps.find((p) => p.key === BATCH_ONE_KEY)?.value;
  if (recorded) return recorded;
  const g = model.graph;
  const mask = g.inputs.find((v) => v.name === 'attention_mask');
  if (!mask || mask.shape?.length !== 2) return null;
  const facts = new GraphFacts(g);
  const tracked = trackAxes(g, mask, [0, 1], facts, () => true);
  for (const n of model.allNodes()) {
    for (const slot of MASK_INPUTS[`${n.domain === 'ai.onnx' ? '' : n.domain}::${n.opType}`] ?? []) {
      const v = n.input(slot);
      const axis = v ? tracked.get(v)?.axes[0] : undefined;
      if (axis === undefined || axis === null || axis === 0) continue;
      // The node that moved the batch off axis 0: walk back while the batch is off it.
      let at = v!;
      for (;;) {
        const from = at.producer?.inputs.find((i) => i && tracked.has(i) && tracked.get(i)!.axes[0] !== 0);
        if (!from) break;
        at = from;
      }
      return `${at.producer?.describe() ?? at.name} moves attention_mask's batch axis to axis ${tracked.get(at)!.axes[0]} of ${at}, so the mask ${n.describe()} reads holds one row only`;
    }
  }
  return null;
}

function recordedLength(model: Model): number {
  const n = Number(model.metadataProps.find((p) => p.key === STATIC_CACHE_LENGTH_KEY)?.value);
  return Number.isInteger(n) && n > 0 ? n : 0;
}

function emptyBinding(layer: number, v: Value, inputs: Map<string, Value>, outputs: Map<string, Value>): KvBinding {
  return {
    layer,
    pastKey: '',
    pastValue: null,
    presentKey: '',
    presentValue: null,
    layout: 'BHTD',
    numHeads: 0,
    headSize: 0,
    dtype: v.dtype === DataType.FLOAT16 ? 'float16' : 'float32',
    pastLength: inputs.has(pastLengthName(layer)) ? pastLengthName(layer) : null,
    presentLength: outputs.has(presentLengthName(layer)) ? presentLengthName(layer) : null,
    pastValid: null,
    presentValid: null,
    maxLength: null,
    ...slotIndices(layer, inputs, outputs),
  };
}

/** Every graph input TensorScatter writes (input 0), with its layout and kv heads (from the Attention reading the write). */
function staticCaches(model: Model): Map<Value, { layout: 'static-BTH' | 'static-BHTD'; kvHeads: number | undefined }> {
  const out = new Map<Value, { layout: 'static-BTH' | 'static-BHTD'; kvHeads: number | undefined }>();
  for (const n of model.allNodes()) {
    if (n.opType !== 'TensorScatter' || (n.domain !== '' && n.domain !== 'ai.onnx')) continue;
    const past = n.input(0);
    if (!past || past.producer || past.isConstant) continue;
    const attention = n
      .output(0)
      .consumers()
      .find((c) => c.opType === 'Attention');
    out.set(past, { layout: past.shape?.length === 3 ? 'static-BTH' : 'static-BHTD', kvHeads: attention?.attrInt('kv_num_heads') });
  }
  return out;
}

function staticShape(
  v: Value,
  s: { layout: 'static-BTH' | 'static-BHTD'; kvHeads: number | undefined },
): Pick<KvBinding, 'layout' | 'numHeads' | 'headSize' | 'maxLength'> {
  const shape = v.shape ?? [];
  const num = (d: unknown) => (typeof d === 'number' ? d : 0);
  if (s.layout === 'static-BTH') {
    const heads = s.kvHeads ?? 0;
    return { layout: s.layout, numHeads: heads, headSize: heads ? num(shape[2]) / heads : 0, maxLength: typeof shape[1] === 'number' ? shape[1] : null };
  }
  return { layout: s.layout, numHeads: num(shape[1]), headSize: num(shape[3]), maxLength: typeof shape[2] === 'number' ? shape[2] : null };
}

/** The graph inputs a static cache's writes and attention read: write_indices (TensorScatter input 2) and nonpad_kv_seqlen (Attention input 6). */
function staticLengthInputs(model: Model, inputs: Map<string, Value>): { write: DecoderIo['writeIndices']; nonpad: DecoderIo['nonpadKvSeqlen'] } {
  let write: DecoderIo['writeIndices'] = null;
  let nonpad: DecoderIo['nonpadKvSeqlen'] = null;
  // A compiled layer writes at its own past_lengths.l: those are not the model's write indices.
  const own = /^past_lengths\.\d+$/;
  const source = (v: Value | null): Value | null => {
    for (let cur = v, hops = 0; cur && hops < 4; hops++) {
      if (inputs.get(cur.name) === cur) return own.test(cur.name) ? null : cur;
      const p = cur.producer;
      cur = p && (p.opType === 'Cast' || p.opType === 'Identity') ? p.input(0) : null;
    }
    return null;
  };
  for (const n of model.allNodes()) {
    if (n.domain !== '' && n.domain !== 'ai.onnx') continue;
    const w = n.opType === 'TensorScatter' ? source(n.input(2)) : null;
    if (w) write ??= { name: w.name, dtype: intType(w) };
    const np = n.opType === 'Attention' ? source(n.input(6)) : null;
    if (np) nonpad ??= { name: np.name, dtype: intType(np) };
  }
  // Every layer converted: the routers still read them, under the names the compile recorded.
  let recorded: Record<string, unknown> = {};
  try {
    recorded = JSON.parse(model.metadataProps.find((p) => p.key === STATIC_CACHE_INPUTS_KEY)?.value ?? '{}') as Record<string, unknown>;
  } catch {
    recorded = {};
  }
  const named = (key: string) => {
    const name = typeof recorded[key] === 'string' ? recorded[key] : key;
    return inputs.has(name) ? { name, dtype: intType(inputs.get(name)!) } : null;
  };
  return { write: write ?? named('write_indices'), nonpad: nonpad ?? named('nonpad_kv_seqlen') };
}

/** An attention op that takes per-row valid lengths instead of a mask (right padding only). */
function lengthBasedAttention(model: Model): string | null {
  for (const n of model.allNodes()) if (n.opType === 'GroupQueryAttention' && n.domain === 'com.microsoft') return n.opType;
  return null;
}

/**
 * The padding side to use: the model's default when none is asked for; a side the model cannot
 * take is refused (a usage error: it would give meaningless outputs even for the original model).
 */
export function resolvePadSide(io: DecoderIo, asked: PadSide | undefined): PadSide {
  if (asked === undefined) return io.paddingSides[0]!;
  if (!io.paddingSides.includes(asked)) {
    const why = io.rightPaddingOnly?.startsWith('a static') ? io.rightPaddingOnly : 'its GroupQueryAttention takes per-row valid lengths (seqlens_k)';
    throw new UsageError(`--pad ${asked} is not supported for this model: ${why}, so only right padding gives meaningful outputs`);
  }
  return asked;
}

/** Rows of the position tables: the table operand of each op that indexes by position. */
const POSITION_TABLES: Record<string, number> = { EmbedLayerNormalization: 3, RotaryEmbedding: 2, GroupQueryAttention: 7 };

function maxPositions(model: Model, positionIds: Value | null): number | null {
  const rows: number[] = [];
  const tableRows = (v: Value | null | undefined) => {
    const dims = v?.initializer?.dims;
    if (dims && dims.length === 2) rows.push(dims[0]!);
  };
  for (const n of model.allNodes()) {
    const slot = POSITION_TABLES[n.opType];
    if (slot !== undefined && n.domain === 'com.microsoft' && (n.opType !== 'GroupQueryAttention' || n.attrInt('do_rotary', 0) === 1)) tableRows(n.input(slot));
    // The standard RotaryEmbedding (opset 23) reads its cos cache at input 1, indexed by position_ids (input 3).
    if (n.opType === 'RotaryEmbedding' && (n.domain === '' || n.domain === 'ai.onnx') && n.input(3)) tableRows(n.input(1));
    if (n.opType === 'Gather' && positionIds && readsThrough(n.input(1), positionIds)) tableRows(n.input(0));
  }
  return rows.length ? Math.min(...rows) : null;
}

/** Whether `v` is `source` or computed from it through single-input nodes (casts, gathers of it). */
function readsThrough(v: Value | null, source: Value, hops = 4): boolean {
  for (let cur = v; cur && hops >= 0; hops--) {
    if (cur === source) return true;
    cur = cur.producer?.input(0) ?? null;
  }
  return false;
}

function stateBinding(v: Value, layer: number, present: string): StateBinding {
  const dims = (v.shape ?? []).map((d, i) => (i === 0 ? -1 : d));
  if (dims.length === 0 || dims.some((d) => typeof d !== 'number')) {
    throw new ModcError(`state input ${v.name} needs static dims besides the batch axis 0 (has [${(v.shape ?? []).join(', ')}])`);
  }
  return { layer, past: v.name, present, dims: dims as number[], dtype: v.dtype === DataType.FLOAT16 ? 'float16' : 'float32' };
}

function pick(outputs: Map<string, Value>, candidates: string[], past: string): string {
  const found = candidates.find((c) => outputs.has(c));
  if (!found) throw new ModcError(`no present output for past input ${past} (looked for ${candidates.join(', ')})`);
  return found;
}
