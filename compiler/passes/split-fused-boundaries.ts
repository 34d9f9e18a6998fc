/**
 * split-fused-boundaries: expose the residual stream where a fused op spans a layer boundary.
 *
 *   SkipLayerNormalization(in, skip, gamma, beta?, bias?)  -> Add(stream, Add(branch, bias)) + LayerNormalization
 *                                                             (at the stream's start: Add(token embedding, other term))
 *   SkipSimplifiedLayerNormalization(in, skip, gamma, bias?) -> Add(stream, Add(branch, bias)) + SimplifiedLayerNormalization
 *   EmbedLayerNormalization(ids, seg, word, pos, segEmb, gamma, beta, mask, pos_ids)
 *                                                          -> Gather(word) + Gather(pos) (+ Gather(seg)) -> Add -> LayerNormalization
 *
 * The sum gets its own value (the fused op's sum output when it had one, so its readers are
 * unchanged), which is what layer extraction and routing need: a layer that is a function of
 * its residual input alone. LayerNormalization and SimplifiedLayerNormalization are used in
 * the default domain at the model's opset: ONNX Runtime registers both there for every opset
 * (LayerNormalization before opset 17 as a contrib kernel), so no opset import changes.
 * Intra-layer fusions (a skip-norm joining attention and MLP of one layer) are left alone,
 * except in the layers named by `within` (sub-layer routing): there the skip-norm at the
 * sub-layer boundary is split the same way, so the stream after attention is a value too.
 */
import { analyzeDecoder } from '../analysis/analyze.js';
import { ModcError } from '../core/errors.js';
import type { FusedBoundary, DecoderStructure } from '../analysis/types.js';
import { DataType } from '../core/ir/dtype.js';
import { attribute, type Graph, type Node, type Value } from '../core/ir/graph.js';
import type { Model } from '../core/ir/model.js';
import { Tensor } from '../core/ir/tensor.js';
import type { Pass } from './pass-manager.js';

export interface SplitOptions {
  /** Layers whose entry and exit boundaries to split (default: every layer). */
  layers?: number[];
  /** Layers whose fused steps inside the layer (the sub-layer boundary) to split as well. */
  within?: number[];
}

export interface SplitResult {
  changed: boolean;
  /** One line per split node: what it became. */
  notes: string[];
}

/** SkipLayerNormalization's default epsilon in ONNX Runtime. */
const SKIP_NORM_EPSILON = 1e-12;

export function splitFusedBoundaries(model: Model, structure: DecoderStructure, opts: SplitOptions = {}): SplitResult {
  const wanted = opts.layers ?? structure.layers.map((l) => l.index);
  const boundaries = new Map<Node, FusedBoundary['op']>();
  for (const index of wanted) {
    const layer = structure.layers[index];
    if (!layer) throw new ModcError(`split-fused-boundaries: no layer ${index} (the model has ${structure.layers.length})`);
    for (const b of [layer.entryBoundary, layer.exitBoundary]) if (b) boundaries.set(b.node, b.op);
  }
  for (const index of opts.within ?? []) {
    const layer = structure.layers[index];
    if (!layer) throw new ModcError(`split-fused-boundaries: no layer ${index} (the model has ${structure.layers.length})`);
    for (const b of [layer.entryBoundary, layer.exitBoundary]) if (b) boundaries.set(b.node, b.op);
    for (const step of layer.steps) if (step.kind !== 'Add') boundaries.set(step.node, step.kind);
  }
  const notes: string[] = [];
  for (const [node, op] of boundaries) {
    if (node.graph !== model.graph) throw new ModcError(`split-fused-boundaries: ${node.describe()} is no longer in the graph; re-analyse before splitting`);
    notes.push(op === 'EmbedLayerNormalization' ? splitEmbedLayerNorm(model.graph, node) : splitSkipNorm(model.graph, node, structure));
  }
  return { changed: notes.length > 0, notes };
}

function splitSkipNorm(g: Graph, node: Node, structure: DecoderStructure): string {
  // A skip-norm is a residual step, or the embedding's boundary when it sums the embedding terms.
  const start = structure.embedding.boundary?.node === node ? structure.embedding.boundary.streamOperandIndex : undefined;
  const step = structure.steps.find((s) => s.node === node) ?? (start !== undefined ? { streamOperandIndex: start, branchOperandIndex: 1 - start } : null);
  if (!step) throw new ModcError(`split-fused-boundaries: ${node.describe()} is not a residual step of the analysed structure`);
  const simplified = node.opType === 'SkipSimplifiedLayerNormalization';
  const [gamma, beta, bias] = simplified ? [node.inputs[2]!, null, node.inputs[3] ?? null] : [node.inputs[2]!, node.inputs[3] ?? null, node.inputs[4] ?? null];
  const base = node.name || 'skip_norm';
  const stream = node.inputs[step.streamOperandIndex]!;
  let branch = node.inputs[step.branchOperandIndex]!;
  if (bias) branch = g.addNode('Add', [branch, bias], 1, { name: `${base}/bias_add`, before: node }).output(0);
  const sumOut = node.outputs[3];
  const sum = sumOut && sumOut.name !== '' ? sumOut : g.newValue(`${base}/residual_sum`, stream.type);
  g.addNode('Add', [stream, branch], [sum], { name: `${base}/residual_add`, before: node });
  const epsilon = node.attrFloat('epsilon', SKIP_NORM_EPSILON);
  const attrs = [attribute('axis', -1, 'int'), attribute('epsilon', epsilon, 'float'), attribute('stash_type', 1, 'int')];
  const normOp = simplified ? 'SimplifiedLayerNormalization' : 'LayerNormalization';
  const statsUsed = [1, 2].filter((i) => isUsed(node.outputs[i], g));
  if (simplified && statsUsed.includes(1))
    throw new ModcError(`split-fused-boundaries: ${node.describe()} output 1 (mean) is read, which SimplifiedLayerNormalization cannot produce`);
  const normOutputs = [node.output(0), ...statsUsed.map((i) => node.outputs[i]!)];
  if (!simplified && statsUsed.length === 1 && statsUsed[0] === 2) normOutputs.splice(1, 0, g.newValue(`${base}/mean`));
  g.addNode(normOp, simplified ? [sum, gamma] : [sum, gamma, beta], normOutputs, { name: `${base}/norm`, before: node, attributes: attrs });
  g.removeNode(node, true);
  return `${node.describe()} -> Add${bias ? ' (+ bias Add)' : ''} giving ${sum} + ${normOp}`;
}

function splitEmbedLayerNorm(g: Graph, node: Node): string {
  const [ids, segmentIds, word, positions, segments, gamma, beta, , positionIds] = Array.from({ length: 9 }, (_, i) => node.inputs[i] ?? null);
  const base = node.name || 'embed_layer_norm';
  const gather = (table: Value, indices: Value, tag: string) =>
    g.addNode('Gather', [table, indices], 1, { name: `${base}/${tag}`, before: node, attributes: [attribute('axis', 0, 'int')] }).output(0);
  const terms = [gather(word!, ids!, 'word_gather')];
  if (positions) terms.push(gather(positions, positionIds ?? defaultPositions(g, node, ids!, base), 'position_gather'));
  if (segments && segmentIds) terms.push(gather(segments, segmentIds, 'segment_gather'));
  const sumOut = node.outputs[2];
  const sum = sumOut && sumOut.name !== '' ? sumOut : g.newValue(`${base}/embedding_sum`);
  let acc = terms[0]!;
  terms.slice(1).forEach((t, i) => {
    const out = i === terms.length - 2 ? [sum] : 1;
    acc = g.addNode('Add', [acc, t], out, { name: `${base}/add_${i}`, before: node }).output(0);
  });
  if (terms.length === 1) g.addNode('Identity', [acc], [sum], { name: `${base}/sum`, before: node });
  const attrs = [attribute('axis', -1, 'int'), attribute('epsilon', node.attrFloat('epsilon', SKIP_NORM_EPSILON), 'float'), attribute('stash_type', 1, 'int')];
  g.addNode('LayerNormalization', [sum, gamma, beta], [node.output(0)], { name: `${base}/norm`, before: node, attributes: attrs });
  keepMaskIndex(g, node);
  g.removeNode(node, true);
  return `${node.describe()} -> Gather x${terms.length} + Add giving ${sum} + LayerNormalization`;
}

/** Positions 0..S-1 (what EmbedLayerNormalization uses without position_ids), shape [S]. */
function defaultPositions(g: Graph, node: Node, ids: Value, base: string): Value {
  const scalar = (name: string, v: number) =>
    g.addInitializer(g.newValue(`${base}/${name}`), Tensor.fromArray(`${base}/${name}`, [], BigInt64Array.from([BigInt(v)]), DataType.INT64));
  const shape = g.addNode('Shape', [ids], 1, { name: `${base}/ids_shape`, before: node }).output(0);
  const length = g
    .addNode('Gather', [shape, scalar('one', 1)], 1, { name: `${base}/seq_len`, before: node, attributes: [attribute('axis', 0, 'int')] })
    .output(0);
  return g.addNode('Range', [scalar('zero', 0), length, scalar('step', 1)], 1, { name: `${base}/positions`, before: node }).output(0);
}

/** mask_index (output 1) is rarely read; when it is, a copy of the fused op keeps computing it. */
function keepMaskIndex(g: Graph, node: Node): void {
  const maskIndex = node.outputs[1];
  if (!isUsed(maskIndex, g)) return;
  const copy = g.addNode(node.opType, node.inputs, [g.newValue(`${node.name}/unused_output`), maskIndex!], {
    domain: node.domain,
    name: `${node.name}/mask_index`,
    before: node,
  });
  for (const a of node.attributes.values()) copy.setAttr(a.proto);
}

function isUsed(v: Value | undefined, g: Graph): boolean {
  return !!v && v.name !== '' && (v.uses.size > 0 || g.outputs.includes(v));
}

/**
 * Splits the requested fused boundaries and returns the analysis of the model as it is then
 * (analysed again only when a node was split): what the tools that cut a model into units need.
 */
export function splitAndAnalyze(model: Model, opts: SplitOptions = {}, structure: DecoderStructure = analyzeDecoder(model)): DecoderStructure {
  return splitFusedBoundaries(model, structure, opts).changed ? analyzeDecoder(model) : structure;
}

/** The pass-manager wrapper: splits the requested layers' boundaries of the analysed model. */
function layerList(option: string, name: string): number[] | undefined {
  const layers = option ? option.split(',').map((s) => Number(s.trim())) : undefined;
  if (layers?.some((l) => !Number.isInteger(l) || l < 0))
    throw new ModcError(`split-fused-boundaries: ${name} must be comma-separated indices, got '${option}'`);
  return layers;
}

export const splitFusedBoundariesPass: Pass<{ layers: string; within: string }> = {
  name: 'split-fused-boundaries',
  description: 'replace SkipLayerNorm/SkipSimplifiedLayerNorm/EmbedLayerNorm nodes that span a layer (or, with within=, a sub-layer) boundary by Add + norm',
  options: [
    { name: 'layers', type: 'string', description: 'comma-separated layer indices (default: all)', default: '' },
    { name: 'within', type: 'string', description: 'layers whose sub-layer boundary (attention to MLP) to split too (default: none)', default: '' },
  ],
  run(model, options, ctx) {
    const layers = layerList(options.layers, 'layers');
    const within = layerList(options.within, 'within');
    return splitFusedBoundaries(model, ctx.structure(), { ...(layers ? { layers } : {}), ...(within ? { within } : {}) });
  },
};
