/**
 * The decoder structure for people and tools: a stable JSON summary, a layer table, and the
 * explanation of every boundary the analysis accepted or rejected (`modc inspect --explain`).
 */
import type { AttentionForm, DecoderStructure, KvLayout, LayerInfo, MaskInfo, SideInput, SideInputKind } from './types.js';

/** One side input by value name; the axis fields appear for the kinds that have them. */
export interface SideInputSummary {
  name: string;
  kind: Exclude<SideInputKind, 'weight'>;
  /** per-token: positions | rotary-cos | rotary-sin | rotary-angles | other; past-kv: key | value | key-and-value; sequence-length: its role. */
  role?: string;
  /** attention-mask: raw-2d | additive-bias | key-padding. */
  form?: string;
  batchAxis?: number | null;
  sequenceAxis?: number | null;
  queryAxis?: number | null;
  keyAxis?: number | null;
  /** other: why it could not be classified. */
  reason?: string;
}

export interface LayerSummary {
  index: number;
  attention: AttentionForm;
  /** Graph input (past) and graph output (present) names; identical for key and value in the combined layout. */
  kv: { key: { input: string; output: string }; value: { input: string; output: string }; layout: KvLayout; numKvHeads: number; headSize: number };
  residualIn: string;
  /** null when a fused op adds the last residual without outputting it. */
  residualOut: string | null;
  nodeCount: number;
  /** Weights and constants are counted, not listed. */
  weights: number;
  sideInputs: SideInputSummary[];
}

/**
 * The JSON form of a DecoderStructure (`modc inspect --json`). Stable: fields are only ever
 * added; names are ONNX value names; layers are in execution order; side inputs in the order
 * the layer's nodes first read them.
 */
export type StructureSummary = Pick<DecoderStructure, 'hiddenSize' | 'numHeads' | 'numKvHeads' | 'headSize' | 'dtype' | 'positional'> & {
  layers: LayerSummary[];
  mask: { form: MaskInfo['form']; inputs: string[]; outputs: string[]; nodeCount: number };
};

export function summarizeStructure(s: DecoderStructure): StructureSummary {
  const { hiddenSize, numHeads, numKvHeads, headSize, dtype, positional } = s;
  return {
    layers: s.layers.map(layerSummary),
    hiddenSize,
    numHeads,
    numKvHeads,
    headSize,
    dtype,
    positional,
    mask: { form: s.mask.form, inputs: s.mask.inputs.map((v) => v.name), outputs: s.mask.outputs.map((v) => v.name), nodeCount: s.mask.nodes.length },
  };
}

function layerSummary(l: LayerInfo): LayerSummary {
  const io = (t: { input: { name: string }; output: { name: string } }) => ({ input: t.input.name, output: t.output.name });
  return {
    index: l.index,
    attention: l.attention.form,
    kv: { key: io(l.kv.key), value: io(l.kv.value), layout: l.kv.layout, numKvHeads: l.kv.numKvHeads, headSize: l.kv.headSize },
    residualIn: l.residualIn.name,
    residualOut: l.residualOut?.name ?? null,
    nodeCount: l.nodes.length,
    weights: l.sideInputs.filter((x) => x.kind === 'weight').length,
    sideInputs: l.sideInputs.filter((x): x is Exclude<SideInput, { kind: 'weight' }> => x.kind !== 'weight').map(sideInputSummary),
  };
}

export function sideInputSummary(x: Exclude<SideInput, { kind: 'weight' }>): SideInputSummary {
  const base = { name: x.value.name };
  switch (x.kind) {
    case 'past-kv':
      return { ...base, kind: x.kind, role: x.role };
    case 'per-token':
      return { ...base, kind: x.kind, role: x.role, batchAxis: x.batchAxis, sequenceAxis: x.sequenceAxis };
    case 'attention-mask':
      return { ...base, kind: x.kind, form: x.form, queryAxis: x.queryAxis, keyAxis: x.keyAxis };
    case 'sequence-length':
      return { ...base, kind: x.kind, role: x.role };
    case 'other':
      return { ...base, kind: x.kind, reason: x.reason };
  }
}

/** Short text for one side input: `kind(name, details)`. */
function sideInputText(x: SideInputSummary): string {
  const axis = (label: string, a: number | null | undefined) => (a === undefined ? [] : [`${label} ${a ?? '?'}`]);
  const details = [
    x.role ?? x.form ?? x.reason,
    ...axis('seq axis', x.sequenceAxis),
    ...axis('query axis', x.queryAxis),
    ...axis('key axis', x.keyAxis),
  ].filter(Boolean);
  return `${x.kind}(${x.name}${details.length ? `: ${details.join(', ')}` : ''})`;
}

/** The layer table and global facts, as lines of text. */
export function formatLayerTable(s: DecoderStructure): string {
  const summary = summarizeStructure(s);
  const lines = [
    `hidden ${summary.hiddenSize}, heads ${summary.numHeads}, kv heads ${summary.numKvHeads}, head size ${summary.headSize}, ${summary.dtype}, positions: ${summary.positional}`,
    `mask: ${summary.mask.form} from ${summary.mask.inputs.join(', ') || 'no input'} via ${summary.mask.nodeCount} shared nodes -> ${summary.mask.outputs.join(', ') || 'nothing'}`,
    `stream: ${s.embedding.output} ... ${s.final.residual ?? `(inside ${s.layers.at(-1)!.exit.node.describe()})`} -> ${s.final.logits}`,
  ];
  for (const l of summary.layers) {
    const kv =
      l.kv.layout === 'combined-2BHTD'
        ? `${l.kv.key.input} -> ${l.kv.key.output} (combined)`
        : `${l.kv.key.input} -> ${l.kv.key.output}, ${l.kv.value.input} -> ${l.kv.value.output}`;
    lines.push(`layer ${l.index}: ${l.attention}, ${l.nodeCount} nodes, %${l.residualIn} -> ${l.residualOut ? `%${l.residualOut}` : '(fused, no value)'}`);
    lines.push(`  kv: ${kv}`);
    lines.push(
      `  reads: ${
        l.sideInputs
          .filter((x) => x.kind !== 'past-kv')
          .map(sideInputText)
          .join(', ') || 'nothing else'
      }; ${l.weights} weights`,
    );
  }
  return lines.join('\n');
}

/** Every candidate boundary with its verdict and reason, one per line. */
export function formatExplanation(s: DecoderStructure): string {
  return s.explain.map((e) => `[${e.verdict}] ${e.subject}${e.layer !== undefined ? ` (layer ${e.layer})` : ''}: ${e.reason}`).join('\n');
}
