/**
 * analyzeDecoder: find the residual stream of a decoder-only LLM from dataflow alone and cut it
 * into layers. Node names are never consulted; the only names read are the decoder I/O
 * contract's (input_ids, attention_mask, position_ids, logits).
 *
 * Cost is linear in the graph: one facts pass, one stream-dependence pass, branch walks that
 * each visit their own nodes, and one ownership pass. External weights are never read.
 */
import { ModcError } from '../core/errors.js';
import type { Graph, Node, Value } from '../core/ir/graph.js';
import type { Model } from '../core/ir/model.js';
import { findEmbedding } from './embedding.js';
import { GraphFacts } from './graph-facts.js';
import { hiddenSizeOf, maskInfo, positionalScheme, streamDtype } from './globals.js';
import { buildLayers } from './layer-info.js';
import { assignNodes, PREFIX, streamDependentValues, type NodeOwnership } from './layers.js';
import { fusedAttentionSchema, isNormOp, MS_DOMAIN } from './ops.js';
import { SideInputClassifier } from './side-inputs.js';
import { walkResidualStream } from './stream.js';
import type { DecoderStructure, Explanation, FinalInfo, LayerInfo, StreamStep } from './types.js';

export interface AnalyzeOptions {
  /** Graph output holding the logits (default: the output named 'logits', else the first). */
  logits?: string;
}

export function analyzeDecoder(model: Model, opts: AnalyzeOptions = {}): DecoderStructure {
  const graph = model.graph;
  assertContractRanks(graph);
  const facts = new GraphFacts(graph);
  assertTopologicalOrder(graph, facts);
  const explain: Explanation[] = [];
  explainShadowedContribOps(model, explain);
  const embedding = findEmbedding(graph, facts, explain);
  const dependent = streamDependentValues(graph, embedding.seeds);
  const ctx = { facts, dependent, graphInputs: new Set(graph.inputs), graphOutputs: new Set(graph.outputs) };
  const steps = walkResidualStream(embedding, ctx, explain);
  const ownership = assignNodes(graph, embedding.info, embedding.seeds, steps, (v) => facts.isConstant(v));
  const isPrefix = (n: Node) => ownership.nodeLayer.get(n) === PREFIX;
  const isSharedNode = (n: Node) => isPrefix(n) && !n.outputs.every((o) => facts.isConstant(o));
  const classifier = new SideInputClassifier(graph, facts, isPrefix);
  const layers = buildLayers(graph, steps, ownership, embedding.info, classifier, ctx);
  explainBoundaries(layers, explain);
  const final = finalInfo(graph, facts, steps, ownership, layers.length, opts, explain, dependent);
  const first = layers.find((l) => l.attention.form !== 'recurrent');
  if (!first)
    throw new ModcError(`no attention layer: all ${layers.length} layers mix tokens through state only (recurrent), and modc routes attention layers`);
  return {
    embedding: embedding.info,
    steps,
    layers,
    final,
    prefixNodes: graph.nodes.filter(isSharedNode),
    suffixNodes: graph.nodes.filter((n) => ownership.nodeLayer.get(n) === layers.length),
    hiddenSize: hiddenSizeOf(embedding.info),
    numHeads: first.attention.numHeads,
    numKvHeads: first.kv.numKvHeads,
    headSize: first.kv.headSize,
    dtype: streamDtype(embedding.info, facts),
    positional: positionalScheme(embedding.info, layers),
    mask: maskInfo(graph, layers, isSharedNode, facts.order),
    explain,
  };
}

/**
 * The contract's token inputs are [batch, sequence]; another declared rank would mis-shape every
 * routing op. attention_mask may also be the caller's 4-D mask [batch, 1, M, M] (query and key
 * axes in sequence-index coordinates; the model slices the rows and columns of each call).
 */
function assertContractRanks(graph: Graph): void {
  for (const v of graph.inputs) {
    if (!['input_ids', 'attention_mask', 'position_ids'].includes(v.name)) continue;
    const rank = v.shape?.length;
    if (v.name === 'attention_mask' && rank === 4) {
      const [, heads, rows, cols] = v.shape!;
      const fixed = (d: unknown) => typeof d === 'number';
      if (heads !== 1 || (fixed(rows) && fixed(cols) && rows !== cols))
        throw new ModcError(`input attention_mask has dims [${v.shape!.join(', ')}]; a caller's 4-D attention mask is [batch, 1, M, M]`);
      continue;
    }
    if (rank !== undefined && rank !== 2)
      throw new ModcError(
        `input ${v.name} has rank ${rank}; a decoder's input_ids, attention_mask and position_ids are [batch, sequence] (attention_mask may also be a caller's [batch, 1, M, M] mask)`,
      );
  }
}

/** Ownership is assigned in one pass in graph order, which must therefore be topological (ONNX requires it). */
function assertTopologicalOrder(graph: Graph, facts: GraphFacts): void {
  for (const n of graph.nodes) {
    for (const v of n.inputs) {
      const p = v?.producer;
      if (p && p.graph === graph && facts.order.get(p)! > facts.order.get(n)!) {
        throw new ModcError(`${n.describe()} reads ${v} before ${p.describe()} computes it: the graph is not in topological order (run the cleanup pass)`);
      }
    }
  }
}

/** Notes on fused nodes spanning layer boundaries: the ones split-fused-boundaries would split. */
/** The com.microsoft ops modc reads by their contrib semantics. */
const CONTRIB_OPS_READ = new Set([
  'Attention',
  'EmbedLayerNormalization',
  'FastGelu',
  'GroupQueryAttention',
  'MatMulNBits',
  'MultiHeadAttention',
  'RotaryEmbedding',
  'SkipLayerNormalization',
  'SkipSimplifiedLayerNormalization',
]);

/**
 * A model-local function named like a contrib op (mobius writes com.microsoft::SkipLayerNormalization)
 * does not change what its nodes compute: ONNX Runtime runs its registered contrib kernel for
 * them, not the function, and modc reads them as that op too. The function stays in the model.
 */
function explainShadowedContribOps(model: Model, explain: Explanation[]): void {
  for (const f of model.functions) {
    if (f.domain !== MS_DOMAIN || !CONTRIB_OPS_READ.has(f.name) || !model.graph.nodes.some((n) => n.domain === f.domain && n.opType === f.name)) continue;
    explain.push({
      subject: `function ${f.domain}::${f.name}`,
      verdict: 'accepted',
      reason: `a model-local function shadows the contrib op of the same name; ONNX Runtime runs the contrib kernel for these nodes, not the function, and modc reads them as that op`,
    });
  }
}

function explainBoundaries(layers: readonly LayerInfo[], explain: Explanation[]): void {
  for (const l of layers) {
    const b = l.exitBoundary;
    if (!b) continue;
    const next = b.normedForLayer === layers.length ? 'the final norm' : `layer ${b.normedForLayer}'s normed input`;
    const sum = b.sum ? `outputs the sum ${b.sum}` : 'does not output the sum';
    explain.push({
      subject: b.node.describe(),
      verdict: 'note',
      layer: l.index,
      reason: `fused layer boundary: adds layer ${l.index}'s residual (${sum}) and computes ${next} ${b.normed}`,
    });
  }
}

/** The end of the stream, checked: logits come after it and no attention follows the last layer. */
function finalInfo(
  graph: Graph,
  facts: GraphFacts,
  steps: readonly StreamStep[],
  ownership: NodeOwnership,
  layerCount: number,
  opts: AnalyzeOptions,
  explain: Explanation[],
  dependent: ReadonlySet<Value>,
): FinalInfo {
  const last = steps.at(-1)!;
  const logits = opts.logits ? graph.outputs.find((v) => v.name === opts.logits) : (graph.outputs.find((v) => v.name === 'logits') ?? graph.outputs[0]);
  if (!logits) throw new ModcError(`no logits output${opts.logits ? ` named '${opts.logits}'` : ''}`);
  const end = last.carried;
  const endText = end ? `${end}` : `the sum inside ${last.node.describe()}`;
  const suffix = graph.nodes.filter((n) => ownership.nodeLayer.get(n) === layerCount);
  const stray = suffix.find((n) => fusedAttentionSchema(n) || n.opType === 'Softmax');
  if (stray) {
    // Post-norm: the stream itself passes through a norm between layers, which no step can add to.
    const through = end ? finalNormAfter(end) : null;
    if (through) {
      throw new ModcError(
        `a post-norm residual stream: ${endText} after layer ${layerCount - 1} passes through ${through.describe()} before ${stray.describe()} (the norm is applied to the stream itself, not to a copy a branch reads); modc routes pre-norm residual streams only`,
      );
    }
    const why = [...explain].reverse().find((e) => e.verdict === 'rejected');
    throw new ModcError(
      `the residual stream ends at ${endText} after layer ${layerCount - 1}, but ${stray.describe()} follows it: expected an Add of the stream and a branch computed from it${why ? ` (last rejected: ${why.subject}: ${why.reason})` : ''}`,
    );
  }
  const step = end ? untakenStep(suffix, end, dependent) : null;
  if (step) {
    const why = [...explain].reverse().find((e) => e.verdict === 'rejected');
    throw new ModcError(
      `the residual stream ends at ${endText} after layer ${layerCount - 1}, but ${step.describe()} adds a stream-dependent branch to a value carried from it: a residual step modc could not follow (it would leave part of a layer in no layer)${why ? ` (last rejected: ${why.subject}: ${why.reason})` : ''}`,
    );
  }
  if (!logits.producer || ownership.nodeLayer.get(logits.producer) !== layerCount) {
    throw new ModcError(`logits ${logits} is not computed from the end of the residual stream (${endText})`);
  }
  const norm = last.kind !== 'Add' ? last.node : finalNormAfter(end!);
  const projection = vocabularyProjection(logits, new Set(suffix), facts);
  const kind = projection ? 'logits' : 'hidden';
  explain.push({
    subject: norm?.describe() ?? endText,
    verdict: 'note',
    reason: projection
      ? `final norm before lm_head (${projection.describe()}); stream ends at ${endText}`
      : `final norm; stream ends at ${endText}; the output ${logits} holds hidden states: no vocabulary projection follows the stream`,
  });
  return { residual: end, norm, logits, kind };
}

/** Ops that project activations by a weight (lm_head's forms, float and quantized). */
const PROJECTIONS = new Set([
  'MatMul',
  'Gemm',
  'FusedMatMul',
  'MatMulNBits',
  'MatMulInteger',
  'MatMulIntegerToFloat',
  'QGemm',
  'QLinearMatMul',
  'DynamicQuantizeMatMul',
]);

/** The weight projection the output is computed through after the stream, if any (lm_head). */
function vocabularyProjection(output: Value, suffix: ReadonlySet<Node>, facts: GraphFacts): Node | null {
  const seen = new Set<Value>();
  const stack = [output];
  while (stack.length) {
    const v = stack.pop()!;
    if (seen.has(v)) continue;
    seen.add(v);
    const p = v.producer;
    if (!p || !suffix.has(p)) continue;
    if (PROJECTIONS.has(p.opType) && p.inputs.some((x) => x !== null && facts.isConstant(x))) return p;
    for (const i of p.inputs) if (i && !facts.isConstant(i)) stack.push(i);
  }
  return null;
}

/**
 * An Add of the suffix that looks like a residual step the walk did not take: one operand is the
 * stream's end carried on by nodes with no other stream-dependent input (casts, scalings, ops the
 * walk does not know), the other is computed from the stream some other way (a branch). A final
 * norm and lm_head add only constants (eps, biases) to such values, so none of theirs matches.
 */
function untakenStep(suffix: readonly Node[], end: Value, dependent: ReadonlySet<Value>): Node | null {
  const carried = new Set<Value>([end]);
  for (const n of suffix) {
    const streamInputs = n.inputs.filter((v): v is Value => v !== null && dependent.has(v));
    const [a, b] = n.inputs;
    if (n.opType === 'Add' && n.domain === '' && a && b && dependent.has(a) && dependent.has(b) && carried.has(a) !== carried.has(b)) return n;
    if (streamInputs.length === 1 && carried.has(streamInputs[0]!)) for (const o of n.outputs) carried.add(o);
  }
  return null;
}

/** The norm reading the last stream value: a norm op, or the ReduceMean of a decomposed one. */
function finalNormAfter(end: Value): Node | null {
  const readers = end.consumers();
  const op = readers.find((n) => isNormOp(n) && n.inputs[0] === end);
  if (op) return op;
  for (const r of readers) {
    if (r.opType === 'ReduceMean') return r;
    const reduce = r.outputs.flatMap((o) => o.consumers()).find((n) => n.opType === 'ReduceMean');
    if (reduce) return reduce;
  }
  return null;
}
