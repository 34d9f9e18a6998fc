/**
 * Walks the residual stream forward from its start. A step is an Add (or a fused skip-norm)
 * with the current stream value as one operand and, as the other, a branch computed from a
 * stream value of the current layer: usually from a normalised copy of it (the norm is recorded
 * as evidence), or from the value itself in a layer with no norm. A step whose branch holds an
 * attention core starts a new layer, which covers sequential pre-norm (two adds per layer)
 * and parallel residual (one add of attn + mlp, or two adds) alike.
 *
 * What keeps other adds out needs no norm: a bias add's other operand is a constant, a mask
 * add's operands are not stream values, and the branch must depend on a stream value of this
 * layer. A post-norm model (the stream itself passes through the norm) ends the walk at its
 * first norm; the analysis then refuses it by name (analyze.ts).
 */
import { ModcError } from '../core/errors.js';
import type { Node, Value } from '../core/ir/graph.js';
import { findAttentionCores, type AttentionContext } from './attention.js';
import { findNormEvidence, walkBranch, type StreamState } from './branch.js';
import type { EmbeddingFound } from './embedding.js';
import { isDefaultDomain, skipNormOp, SKIP_SUM_OUTPUT } from './ops.js';
import type { Explanation, StreamStep } from './types.js';

export interface StreamContext extends AttentionContext {
  dependent: ReadonlySet<Value>;
}

interface Candidate {
  node: Node;
  streamOperandIndex: number;
}

type StepTrial = { step: Omit<StreamStep, 'layer'> } | { reason: string };

class StreamWalker {
  private readonly streamValues = new Set<Value>();
  private readonly normedCopies = new Map<Value, { node: Node; of: Value }>();
  /** Stream values since the current layer's residualIn. */
  private layerValues = new Set<Value>();
  private layer = -1;
  readonly steps: StreamStep[] = [];

  constructor(
    private readonly ctx: StreamContext,
    private readonly explain: Explanation[],
  ) {}

  private get state(): StreamState {
    return { dependent: this.ctx.dependent, streamValues: this.streamValues, normedCopies: this.normedCopies };
  }

  run(start: EmbeddingFound): StreamStep[] {
    let current: Value | null = start.info.output;
    this.streamValues.add(current);
    this.layerValues.add(current);
    const b = start.info.boundary;
    if (b) this.normedCopies.set(b.normed, { node: b.node, of: current });
    while (current) {
      const step = this.nextStep(current);
      if (!step) break;
      this.steps.push(step);
      current = this.advance(step);
    }
    return this.steps;
  }

  private nextStep(current: Value): StreamStep | null {
    let chosen: StreamStep | null = null;
    for (const c of this.candidates(current)) {
      if (chosen) this.note(c.node, 'rejected', `the stream already continues through ${chosen.node.describe()}`);
      else chosen = this.judge(c, current);
    }
    return chosen;
  }

  /** The step through candidate `c`, or null with the reason recorded. */
  private judge(c: Candidate, current: Value): StreamStep | null {
    const trial = this.tryStep(c, current);
    if ('reason' in trial) {
      this.note(c.node, 'rejected', trial.reason);
      return null;
    }
    const startsLayer = trial.step.attention !== null;
    if (!startsLayer && this.layer < 0) {
      this.note(
        c.node,
        'rejected',
        'its branch has no attention core, and the first layer must start with one (com.microsoft Attention/MultiHeadAttention/GroupQueryAttention, or Softmax over MatMul(Q, K^T))',
      );
      return null;
    }
    if (startsLayer) this.layer++;
    const what = startsLayer ? `starts layer ${this.layer} (${trial.step.attention!.form} attention in the branch)` : `continues layer ${this.layer}`;
    const via = trial.step.norm ? `branch reads a normalised copy via ${trial.step.norm.node.describe()}` : `branch reads ${trial.step.input} with no norm`;
    this.note(c.node, 'accepted', `residual step: ${current} + ${trial.step.branch}; ${what}; ${via}`);
    return { ...trial.step, layer: this.layer };
  }

  /** Records the step's sum (and the values carrying it) as stream values; returns the new one (null ends the stream). */
  private advance(step: StreamStep): Value | null {
    if (step.attention) this.layerValues = new Set([step.streamIn]);
    if (step.kind !== 'Add' && step.sum) this.normedCopies.set(step.node.output(0), { node: step.node, of: step.sum });
    if (!step.sum) return null;
    for (const v of [step.sum, ...step.carry.map((n) => n.output(0))]) {
      this.streamValues.add(v);
      this.layerValues.add(v);
    }
    return step.carried;
  }

  /**
   * The value-preserving nodes carrying `sum` on: while a value's only reader (Shape aside) is an
   * Identity or a Cast to its own element type, the stream continues through it. A Cast to
   * another type (a change of precision) does not carry the stream; the reason is recorded.
   */
  private carryOf(sum: Value): { carry: Node[]; carried: Value } {
    const carry: Node[] = [];
    let v = sum;
    for (;;) {
      const readers = v.consumers().filter((n) => n.opType !== 'Shape');
      const n = readers.length === 1 ? readers[0]! : null;
      if (!n || !isDefaultDomain(n) || n.inputs[0] !== v) break;
      if (n.opType === 'Cast') {
        const from = this.ctx.facts.dtype(v);
        const to = n.attrInt('to');
        if (from === undefined || to !== from) {
          this.note(
            n,
            'rejected',
            `the stream value ${v} is cast to another element type (${from ?? 'unknown'} -> ${to}); only a value-preserving Cast or Identity carries the residual stream`,
          );
          break;
        }
      } else if (n.opType !== 'Identity') break;
      carry.push(n);
      v = n.output(0);
    }
    return { carry, carried: v };
  }

  /** Adds and skip-norms reading `current` as operand 0 or 1, in graph order. */
  private candidates(current: Value): Candidate[] {
    const out: Candidate[] = [];
    for (const u of current.uses) {
      const n = u.node;
      if (u.index > 1 || out.some((c) => c.node === n)) continue;
      const isAdd = n.opType === 'Add' && isDefaultDomain(n) && n.inputs.length === 2;
      if (isAdd || skipNormOp(n)) out.push({ node: n, streamOperandIndex: u.index });
    }
    const order = this.ctx.facts.order;
    return out.sort((a, b) => order.get(a.node)! - order.get(b.node)!);
  }

  private tryStep(c: Candidate, current: Value): StepTrial {
    const branchOperandIndex = 1 - c.streamOperandIndex;
    const branch = c.node.inputs[branchOperandIndex];
    if (!branch || branch === current) return { reason: 'both operands are the stream' };
    if (!this.ctx.dependent.has(branch)) return { reason: `the other operand ${branch} does not depend on the residual stream` };
    const walk = walkBranch(branch, this.state);
    if (walk.nodes.size === 0) return { reason: `the other operand ${branch} is itself a stream value` };
    const order = this.ctx.facts.order;
    const branchNodes = [...walk.nodes].sort((a, b) => order.get(a)! - order.get(b)!);
    const cores = findAttentionCores(branchNodes, this.ctx);
    if (cores.length > 1) return { reason: `its branch holds ${cores.length} attention cores; one per layer is supported` };
    const allowed = cores.length ? new Set([current]) : new Set([...this.layerValues, current]);
    const norm = findNormEvidence(walk, allowed, this.state);
    // No norm: the branch reads a stream value of this layer directly (the latest one it reads).
    const read = norm
      ? null
      : [...walk.reads.keys()]
          .filter((v) => allowed.has(v))
          .sort((a, b) => this.streamOrder(a) - this.streamOrder(b))
          .at(-1);
    if (!norm && !read) return { reason: `its branch ${branch} is computed from no stream value of this layer` };
    const kind = skipNormOp(c.node) ?? 'Add';
    const sumOut = kind === 'Add' ? c.node.output(0) : c.node.outputs[SKIP_SUM_OUTPUT];
    const sum = sumOut && sumOut.name !== '' ? sumOut : null;
    const { carry, carried } = kind === 'Add' && sum ? this.carryOf(sum) : { carry: [], carried: sum };
    return {
      step: {
        node: c.node,
        kind,
        streamIn: current,
        streamOperandIndex: c.streamOperandIndex,
        branchOperandIndex,
        branch,
        sum,
        carry,
        carried,
        norm,
        input: norm?.of ?? read!,
        branchNodes,
        attention: cores[0] ?? null,
      },
    };
  }

  /** Stream values in the order the walk accepted them. */
  private streamOrder(v: Value): number {
    return [...this.streamValues].indexOf(v);
  }

  private note(node: Node, verdict: Explanation['verdict'], reason: string): void {
    this.explain.push({ subject: node.describe(), verdict, reason, ...(this.layer >= 0 ? { layer: this.layer } : {}) });
  }
}

export function walkResidualStream(start: EmbeddingFound, ctx: StreamContext, explain: Explanation[]): StreamStep[] {
  const steps = new StreamWalker(ctx, explain).run(start);
  if (steps.length === 0) {
    const out = start.info.output;
    const readers =
      out
        .consumers()
        .map((n) => n.describe())
        .join(', ') || 'nothing';
    const why = explain.find((e) => e.verdict === 'rejected');
    const detail = why ? ` (${why.subject}: ${why.reason})` : '';
    throw new ModcError(
      `no residual stream: expected an Add fed by the embedding output ${out} and a branch computed from it (usually through a norm); ${out} is read by ${readers}${detail}`,
    );
  }
  return steps;
}
