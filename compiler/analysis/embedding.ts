/**
 * The start of the residual stream: EmbedLayerNormalization's embedding sum, or the token
 * Gather of a [vocab, hidden] table by input_ids plus whatever stream-independent terms are
 * added to it before the first layer (absolute position embeddings, a constant scale). Where a
 * skip-norm adds such a term (mobius: SkipLayerNormalization(token, position)), its sum output
 * starts the stream and the node is the embedding's fused boundary, as EmbedLayerNormalization is.
 */
import { ModcError } from '../core/errors.js';
import { dependsOn, type Graph, type Node, type Value } from '../core/ir/graph.js';
import type { GraphFacts } from './graph-facts.js';
import { EMBED_SUM_OUTPUT, isDefaultDomain, isEmbedLayerNorm, SKIP_SUM_OUTPUT, skipNormOp } from './ops.js';
import type { EmbeddingInfo, Explanation, FusedBoundary } from './types.js';

export interface EmbeddingFound {
  info: EmbeddingInfo;
  /** Values the stream-dependence closure starts from (the sum, and EmbedLayerNorm's normed output). */
  seeds: Value[];
}

/** Ops an id tensor may pass through on its way to the embedding Gather. */
const ID_PASS_THROUGH = new Set(['Cast', 'Reshape', 'Unsqueeze', 'Squeeze', 'Identity', 'Flatten']);

export function findEmbedding(graph: Graph, facts: GraphFacts, explain: Explanation[]): EmbeddingFound {
  const fused = graph.nodes.find(isEmbedLayerNorm);
  if (fused) return fusedEmbedding(fused, explain);
  const ids = graph.inputs.find((v) => v.name === 'input_ids');
  const embeds = graph.inputs.find((v) => v.name === 'inputs_embeds');
  if (!ids && embeds) {
    if (facts.rank(embeds) !== 3)
      throw new ModcError(`no residual stream: inputs_embeds must be [batch, sequence, hidden], found rank ${facts.rank(embeds) ?? 'unknown'}`);
    explain.push({
      subject: `%${embeds.name}`,
      verdict: 'accepted',
      reason: 'stream start: the decoder is fed embeddings (inputs_embeds), the token table lives in another model',
    });
    const { output, positionTable, boundary } = absorbStreamIndependentTerms(embeds, facts, explain);
    return { info: { output, table: embeds, positionTable, boundary }, seeds: boundary ? [output, boundary.normed] : [output] };
  }
  if (!ids) {
    const names = graph.inputs
      .filter((v) => !v.isConstant)
      .map((v) => v.name)
      .join(', ');
    throw new ModcError(
      `no residual stream: expected a token embedding Gather by input_ids, but the model has no input_ids input (inputs: ${names || 'none'})`,
    );
  }
  const gather = tokenGather(ids, facts);
  if (!gather) {
    const readers =
      ids
        .consumers()
        .map((n) => n.describe())
        .join(', ') || 'nothing';
    throw new ModcError(`no residual stream: expected a Gather of a 2-D [vocab, hidden] initializer by input_ids; input_ids is read by ${readers}`);
  }
  explain.push({ subject: gather.describe(), verdict: 'accepted', reason: `token embedding: Gather of ${gather.inputs[0]!} by input_ids` });
  const { output, positionTable, boundary } = absorbStreamIndependentTerms(gather, facts, explain);
  return { info: { output, table: gather.inputs[0]!, positionTable, boundary }, seeds: boundary ? [output, boundary.normed] : [output] };
}

function fusedEmbedding(node: Node, explain: Explanation[]): EmbeddingFound {
  const sum = node.outputs[EMBED_SUM_OUTPUT];
  if (!sum || sum.name === '') {
    throw new ModcError(
      `no residual stream: ${node.describe()} does not output the embedding sum (output ${EMBED_SUM_OUTPUT}), so the stream start is not a value in the graph`,
    );
  }
  const normed = node.output(0);
  explain.push({
    subject: node.describe(),
    verdict: 'accepted',
    reason: `stream start: output ${EMBED_SUM_OUTPUT} ${sum} (embedding sum); output 0 ${normed} is layer 0's normed input`,
  });
  const positions = node.inputs[3] ?? null;
  return {
    info: {
      output: sum,
      table: node.inputs[2]!,
      positionTable: positions,
      boundary: { node, op: 'EmbedLayerNormalization', sum, normed, addsForLayer: -1, normedForLayer: 0 },
    },
    seeds: [sum, normed],
  };
}

/** The Gather reading a constant [V, H] table with indices derived from input_ids. */
function tokenGather(ids: Value, facts: GraphFacts): Node | undefined {
  const frontier = [ids];
  const seen = new Set<Value>();
  while (frontier.length) {
    const v = frontier.pop()!;
    if (seen.has(v)) continue;
    seen.add(v);
    for (const u of v.uses) {
      const n = u.node;
      if (n.opType === 'Gather' && isDefaultDomain(n) && u.index === 1 && isTable(n.inputs[0], facts)) return n;
      if (ID_PASS_THROUGH.has(n.opType) && u.index === 0) frontier.push(n.output(0));
    }
  }
  return undefined;
}

const isTable = (v: Value | null, facts: GraphFacts) => !!v && facts.isConstant(v) && facts.rank(v) === 2;

/**
 * Walks past terms added to the token embedding that do not depend on it (position and
 * token-type embeddings) and constant scalings, while the embedding has a single non-Shape
 * reader. Stops at the first reader that could be a layer, or at a skip-norm adding such a term
 * (then the stream starts at its sum output, and the node is the embedding's fused boundary).
 */
function absorbStreamIndependentTerms(
  start: Node | Value,
  facts: GraphFacts,
  explain: Explanation[],
): { output: Value; positionTable: Value | null; boundary: FusedBoundary | null } {
  const token = 'opType' in start ? start.output(0) : start;
  let output = token;
  let positionTable: Value | null = null;
  for (;;) {
    const readers = output.consumers().filter((n) => n.opType !== 'Shape');
    if (readers.length !== 1) break;
    const n = readers[0]!;
    const other = n.inputs.find((v) => v !== output) ?? null;
    const fused = skipNormOp(n);
    const slot = n.inputs.indexOf(output);
    if (fused && (slot === 0 || slot === 1) && n.inputs[1 - slot] && !dependsOn(n.inputs[1 - slot]!, token)) {
      const boundary = skipNormStart(n, fused, slot, facts, explain);
      positionTable ??= tableOf(n.inputs[1 - slot]!, facts);
      return { output: boundary.sum!, positionTable, boundary };
    }
    if (n.opType === 'Add' && other && !dependsOn(other, token)) {
      const table = tableOf(other, facts);
      positionTable ??= table;
      explain.push({
        subject: n.describe(),
        verdict: 'accepted',
        reason: `embedding term ${other} added before the first layer${table ? ` (position table ${table})` : ''}`,
      });
    } else if ((n.opType === 'Mul' || n.opType === 'Div') && other && facts.isConstant(other)) {
      explain.push({ subject: n.describe(), verdict: 'accepted', reason: 'constant embedding scale' });
    } else if (n.opType !== 'Cast') {
      break;
    }
    output = n.output(0);
  }
  return { output, positionTable, boundary: null };
}

/** A Gather's [V, H] table, when `v` is a row lookup of one (a position or token-type embedding). */
const tableOf = (v: Value, facts: GraphFacts): Value | null =>
  v.producer?.opType === 'Gather' && isTable(v.producer.inputs[0], facts) ? v.producer.inputs[0]! : null;

/**
 * A skip-norm summing the embedding and a stream-independent term: its sum output starts the
 * stream, its normed output is layer 0's normed input.
 */
function skipNormStart(n: Node, op: FusedBoundary['op'], slot: number, facts: GraphFacts, explain: Explanation[]): FusedBoundary {
  const sum = n.outputs[SKIP_SUM_OUTPUT];
  if (!sum || sum.name === '') {
    throw new ModcError(
      `no residual stream: ${n.describe()} sums the embedding terms but does not output the sum (output ${SKIP_SUM_OUTPUT}), so the stream start is not a value in the graph`,
    );
  }
  const table = tableOf(n.inputs[1 - slot]!, facts);
  explain.push({
    subject: n.describe(),
    verdict: 'accepted',
    reason: `stream start: output ${SKIP_SUM_OUTPUT} ${sum} (embedding sum${table ? `, position table ${table}` : ''}); output 0 ${n.output(0)} is layer 0's normed input`,
  });
  return { node: n, op, sum, normed: n.output(0), addsForLayer: -1, normedForLayer: 0, streamOperandIndex: slot };
}
