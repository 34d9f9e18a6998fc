/**
 * The one-token call of a routed layer (routed-layer.ts). A batch-1 call of one token the router
 * selects needs no compaction: the token's gathers, the scatter back, and the keys mask or causal
 * bias of one query are the identity or simpler there. Inside the layer's If, small If nodes on
 * the call's shape (B = 1 and S = 1, computed once per call, off shapes) skip them, and the
 * compaction leaves the main graph:
 *
 *   any      = ReduceMax(Cast(selected)) > 0                              main graph
 *   If(any) {
 *     x_sel, .., keys, mask
 *              = If(one) { x, .., Concat(past_valid, selected), the keys as one query's mask }
 *                else { CompactTokens, the gathers, Concat(past_valid, valid), the causal (Trilu)
 *                       bias or the keys expanded over the queries }
 *     the region
 *     out      = If(one) { y } else { CompactTokens, ScatterTokens }       y's own add in each branch
 *   } else { x, the past caches }
 *
 * The keys and the masks built from them join the entry when that is all they read (else the
 * entry passes `valid` on and they stay in the region).
 * The region and its cache appends stay in the layer's If, one level below the weights; the small
 * Ifs hold no weight. Compaction is the identity for one selected token of one row, so both
 * branches compute the same values. A layer whose region reads the compaction otherwise (a
 * caller's 4-D mask gathered at the indices, a static cache written at the count), or a gated
 * one, keeps the plain compacted branch.
 */
import { DataType } from '../core/ir/dtype.js';
import { Graph, graphAttribute, type Node, type Value } from '../core/ir/graph.js';
import type { StepForm } from './cache-contract.js';
import { elementType, type LayerRouting, passOutput } from './mod-common.js';
import { Emitter } from './modc-ops/emitter.js';

export interface StepContext {
  graph: Graph;
  e: Emitter;
  tag: string;
  routing: LayerRouting;
  /** The compacted branch's nodes (still in the main graph); the If nodes made here join it. */
  inside: Set<Node>;
  /** The region's own nodes. */
  region: ReadonlySet<Node>;
  scatter: Value;
  /** Value made for the selected tokens -> the value it stands for when every token is selected. */
  subs: ReadonlyMap<Value, Value>;
  forms: ReadonlyMap<Value, StepForm>;
}

/** Ops a region may end in (its residual add) that the exit may run in its branches. */
const ELEMENTWISE_EXIT = new Set(['Add', 'Sub', 'Mul']);

/** What the one-token Ifs' names hold (`modc/layer3/one_token_in`): inspect finds them by it. */
export const ONE_TOKEN_IF = '/one_token_';

/** (B = 1 and S = 1) of a call, made once per graph from the token mask every router reads. */
const oneTokenCalls = new WeakMap<Graph, Value>();

function oneTokenCall(g: Graph, opset: number, tokenMask: Value): Value {
  let v = oneTokenCalls.get(g);
  if (!v) {
    const e = new Emitter(g, opset, 'modc/');
    // B x S = 1 exactly when B = 1 and S = 1.
    v = e.op('Equal', [e.op('Size', [tokenMask]), e.i64(1)]);
    oneTokenCalls.set(g, v);
  }
  return v;
}

/** The nodes of `pool` that only feed `seeds` (directly or through each other), the seeds' producers included. */
function feeders(pool: ReadonlySet<Node>, seeds: Node[]): Set<Node> {
  const set = new Set(seeds);
  for (let grew = true; grew;) {
    grew = false;
    for (const n of pool) {
      if (set.has(n) || n.outputs.some((v) => n.graph?.outputs.includes(v))) continue;
      const uses = n.outputs.flatMap((v) => [...v.uses]);
      if (uses.length && uses.every((u) => set.has(u.node))) {
        set.add(n);
        grew = true;
      }
    }
  }
  return set;
}

/**
 * Rewrites the compacted branch as the file comment says; returns the layer If's condition, or
 * null (nothing changed) when the branch reads the compaction another way.
 */
export function splitOneToken(c: StepContext): { cond: Value; out: Value } | null {
  const { graph: g, e, routing } = c;
  const compact = routing.indices.producer;
  const selected = compact?.input(0);
  const tokenMask = routing.grid?.[0]?.producer?.input(0);
  const scatterNode = c.scatter.producer;
  if (!compact || !selected || !tokenMask || !scatterNode || scatterNode.opType !== 'ScatterTokens') return null;
  const compaction = new Set([routing.indices, routing.slots, routing.count, routing.any].filter((v): v is Value => v !== null));
  // The compaction leaves the main graph: nothing there may read it.
  if (compact.outputs.some((v) => [...v.uses].some((u) => !c.inside.has(u.node)))) return null;
  // Pools exclude the region's own nodes: they all feed the scatter in the end.
  const added = new Set([...c.inside].filter((n) => !c.region.has(n)));
  const exit = feeders(added, [scatterNode]);
  // What the region reads of the compaction: gathered values and valid (shapes of K are read off valid).
  const entryValues: Value[] = [];
  for (const v of [...c.subs.keys(), routing.valid]) {
    if (![...v.uses].some((u) => c.inside.has(u.node) && !exit.has(u.node) && !c.subs.has(u.node.outputs[0]!))) continue;
    if (entryValues.includes(v)) continue;
    entryValues.push(v);
  }
  const entryPool = new Set([...added].filter((n) => !exit.has(n)));
  entryPool.add(compact);
  const entry = feeders(
    entryPool,
    entryValues.map((v) => v.producer!).filter((n) => entryPool.has(n)),
  );
  entry.add(compact);
  // Only what is read beyond the entry leaves it.
  for (let i = entryValues.length - 1; i >= 0; i--) if (![...entryValues[i]!.uses].some((u) => !entry.has(u.node))) entryValues.splice(i, 1);
  for (const n of c.inside) {
    if (entry.has(n)) continue;
    for (const v of n.inputs) {
      if (!v) continue;
      if (compaction.has(v) && !exit.has(n)) return null;
    }
  }
  if (!entryValues.length) return null;
  for (const v of entryValues) {
    const sub = c.subs.get(v);
    if (sub?.producer && c.inside.has(sub.producer)) return null;
  }
  for (const n of entry)
    for (const v of n.outputs)
      for (const u of v.uses) if (!entry.has(u.node) && !entryValues.includes(v) && u.node !== scatterNode && !exit.has(u.node)) return null;

  const one = oneTokenCall(g, e.opset, tokenMask);
  const branchIf = (name: string, outs: Value[], then: (b: Emitter) => Value[], moved: Set<Node>): Value[] => {
    const thenG = new Graph(`modc/${c.tag}/${name}_then`, g);
    const te = new Emitter(thenG, e.opset, `modc/${c.tag}/${name}/`);
    const before = new Set(g.nodes);
    const made = then(te);
    // What the branch builder made with an emitter of the main graph belongs to the branch.
    g.moveNodesTo(new Set(g.nodes.filter((n) => !before.has(n))), thenG);
    thenG.outputs = made.map((v, i) => {
      const out = v.producer?.graph === thenG ? v : te.op('Identity', [v]);
      out.type = elementType(outs[i]!);
      return out;
    });
    const elseG = new Graph(`modc/${c.tag}/${name}_else`, g);
    g.moveNodesTo(moved, elseG);
    elseG.outputs = outs;
    elseG.toposort();
    thenG.toposort();
    const results = outs.map((v) => g.newValue(`${v.name}_${name}`, elementType(v)));
    const node = g.addNode('If', [one], results, { name: `modc/${c.tag}/${name}` });
    node.setAttr(graphAttribute('then_branch'), thenG);
    node.setAttr(graphAttribute('else_branch'), elseG);
    for (const n of moved) c.inside.delete(n);
    c.inside.add(node);
    outs.forEach((v, i) => {
      for (const u of [...v.uses]) if (u.node.graph !== elseG) u.node.setInput(u.index, results[i]!);
    });
    return results;
  };

  // The exit: the scatter, with a compaction of its own.
  const exitCompact = g.cloneNodes([compact], new Map(), { suffix: '_exit' })[0]!;
  for (const n of exit)
    n.inputs.forEach((v, i) => {
      const k = v ? compact.outputs.indexOf(v) : -1;
      if (k >= 0) n.setInput(i, exitCompact.output(k));
    });
  const y = scatterNode.input(4)!;
  // The region's last node (its residual add), when the scatter is all that reads it, moves into
  // both branches: the one-token branch then makes its output itself instead of copying y out
  // with an Identity (ONNX Runtime refuses an outer value returned as is).
  const last = y.producer;
  const movable =
    last !== null &&
    c.region.has(last) &&
    ELEMENTWISE_EXIT.has(last.opType) &&
    !g.outputs.includes(y) &&
    [...y.uses].every((u) => u.node === scatterNode) &&
    last.inputs.every((v) => v !== null && !v.initializer);
  const [out] = branchIf(
    'one_token_out',
    [c.scatter],
    () => (movable ? [g.cloneNodes([last], new Map(), { suffix: '_one_token' })[0]!.output(0)] : [y]),
    new Set([...exit, exitCompact, ...(movable ? [last] : [])]),
  );
  if (g.outputs.includes(c.scatter)) passOutput(g, c.scatter, out!, '_branch');

  // The layer's keys, Concat(past_valid, valid), and the keys mask or causal bias built from them
  // join the entry when that is all they read: one query reads every valid key.
  const keysNode = [...routing.valid.uses]
    .map((u) => u.node)
    .find((n) => n.opType === 'Concat' && c.inside.has(n) && !c.region.has(n) && n.inputs.length === 2 && n.input(1) === routing.valid);
  const keys = keysNode?.output(0) ?? null;
  const stepValues = new Map<Value, () => Value>();
  if (keysNode && keys && !(keysNode.input(0)?.producer && c.inside.has(keysNode.input(0)!.producer!))) {
    const pool = new Set([...c.inside].filter((n) => !entry.has(n) && !c.region.has(n) && n !== keysNode));
    const joined = new Set<Node>([keysNode]);
    const forms: [Value, StepForm][] = [];
    for (const [bias, form] of c.forms) {
      if (!bias.producer || !pool.has(bias.producer)) continue;
      const chain = feeders(pool, [bias.producer]);
      const reads = [...chain].flatMap((n) => n.inputs.filter((v): v is Value => v !== null));
      if (!reads.every((v) => v === keys || !v.producer || chain.has(v.producer) || entry.has(v.producer) || !c.inside.has(v.producer))) continue;
      for (const n of chain) joined.add(n);
      forms.push([bias, form]);
    }
    if (forms.length) {
      for (const n of joined) entry.add(n);
      const thenKeys = () => e.op('Concat', [keysNode.input(0)!, selected], { axis: 1 });
      let thenKeysMade: Value | null = null;
      const keysOnce = () => (thenKeysMade ??= thenKeys());
      stepValues.set(keys, keysOnce);
      for (const [bias, form] of forms) stepValues.set(bias, () => form((v) => (v === keys ? keysOnce() : v)));
      entryValues.push(keys, ...forms.map(([bias]) => bias));
      for (let i = entryValues.length - 1; i >= 0; i--) {
        const v = entryValues[i]!;
        if (!g.outputs.includes(v) && ![...v.uses].some((u) => !entry.has(u.node))) entryValues.splice(i, 1);
      }
    }
  }

  // The entry: the gathers, the compaction, and the keys when they joined it. A graph output (the
  // keys, as present_valid) keeps its Value, which the layer's If carries: the If makes it, and
  // the compacting branch a value of its own.
  const kept = new Map<Value, Value>();
  entryValues.forEach((v, i) => {
    if (!g.outputs.includes(v)) return;
    const inner = g.newValue(`${v.name}_compacted`, v.type);
    const node = v.producer!;
    node.setOutputs(node.outputs.map((o) => (o === v ? inner : o)));
    for (const u of [...v.uses]) if (entry.has(u.node)) u.node.setInput(u.index, inner);
    if (stepValues.has(v)) stepValues.set(inner, stepValues.get(v)!);
    entryValues[i] = inner;
    kept.set(inner, v);
  });
  const results = branchIf(
    'one_token_in',
    entryValues,
    () => {
      const made = new Map<Value, Value>();
      return entryValues.map((v) => {
        const step = v === routing.valid ? selected : (stepValues.get(v)?.() ?? c.subs.get(v)!);
        // A value the branch returns twice leaves it twice: once through an Identity.
        const twice = [...made.values()].includes(step);
        made.set(v, step);
        return twice ? e.op('Identity', [step]) : step;
      });
    },
    entry,
  );
  const entryIf = results[0]!.producer!;
  entryIf.setOutputs(entryIf.outputs.map((r, i) => kept.get(entryValues[i]!) ?? r));
  return { cond: e.op('Greater', [e.reduceMax(e.cast(selected, DataType.INT64), [0, 1], false), e.i64(0)]), out: out! };
}
