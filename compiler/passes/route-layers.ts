/**
 * route-layers: makes each routed layer (or sub-layer) process only its selected tokens
 * (SPEC.md, "One converted layer", "Sub-layer routing"). For a layer with residual input x and
 * routing (indices, valid, count):
 *
 *   x_sel = GatherTokens(x, indices)                    the layer now reads x_sel
 *   per-token side inputs (positions, rotary cos/sin)   gathered the same way: original positions
 *   masks and sequence lengths                          recomputed from this layer's own keys:
 *       attention_mask -> KeyMask(past_lengths.l, P_l, valid)  (GQA: PrefixMask(past + K, P_l + K))
 *       input_ids / position_ids / stream values       -> their gathered versions
 *   present K/V                                         re-packed per row: GatherKv(present, Compact(keep))
 *   out = ScatterTokens[Gated](x, indices, valid, x_sel, y)   replaces the layer's output y downstream
 *
 * The compiled layer's cache holds only its selected tokens, right-padded per row: its interface
 * gains `past_lengths.l` / `present_lengths.l` (int64 [batch]) and its own past length dim.
 * The layer's exit must be a plain residual add: run split-fused-boundaries first.
 *
 * A sub-layer part (compiler/analysis/sub-layers.ts) is routed the same way, on its own nodes
 * only: its input (x, or h for a sequential MLP) is gathered, and its update u (a or m) is
 * scattered into zeros, so the residual add it feeds adds u (or g * u) for selected tokens and
 * nothing for the others:
 *
 *   u_full = ScatterTokens[Gated](0, indices, valid, 0_sel, u)   replaces u at its join Add
 *
 * An attention part compacts the layer's KV cache as a block does; an MLP part leaves it alone.
 *
 * Where the cache is appended by `Concat(past, new)` (the unfused form), the append stays in the
 * main graph and no full cache passes through an If (`appendOutsideIf`, the decode fast path);
 * the fused forms keep the layer, with its cache packing, inside one If (`skipWhenNothingSelected`).
 */
import { analyzeDecoder } from '../analysis/analyze.js';
import { kvCompactionBlocker } from '../analysis/attention.js';
import type { DecoderStructure, KvTensor, LayerInfo, SideInput } from '../analysis/types.js';
import { subLayersOf } from '../analysis/sub-layers.js';
import { tokenCouplingBlocker } from '../analysis/token-coupling.js';
import { GraphFacts } from '../analysis/graph-facts.js';
import { coreNodes } from '../analysis/layers.js';
import { ModcError } from '../core/errors.js';
import { DataType, type DataTypeCode } from '../core/ir/dtype.js';
import { Graph, type Node, tensorType, Value, withDim } from '../core/ir/graph.js';
import type { Model } from '../core/ir/model.js';
import { graphInputsReached, recomputeWith, replaceUsesWithin } from '../core/ir/rewrite.js';
import type { Pass } from './pass-manager.js';
import { AttributeType, type AttributeProto, type TypeProto } from '../core/proto/index.js';
import { pastLengthName, pastSequenceIndicesName, presentLengthName, presentSequenceIndicesName } from '../metadata/decoder-io.js';
import { callerMask, maskFill, sequenceLengthInput } from './caller-mask.js';
import { Emitter } from './modc-ops/emitter.js';
import { callModcOp, defaultOpset, MODC_DOMAIN } from './modc-ops/index.js';
import { readRoutingMetadata, writeRoutingMetadata } from '../metadata/routing-metadata.js';
import type { RoutedPart } from '../routing/router-weights.js';
import { describeLayerPart } from '../routing/routing-plan.js';
import { Tensor } from '../core/ir/tensor.js';
import { routingOf, type LayerRouting, streamElementType } from './mod-common.js';
import { elementTypeOf, kvAppendsOf, sliceWithin, type KvAppend } from './kv-append.js';
import { isStaticLayout } from '../analysis/types.js';
import { compactStaticCache, maskCompactedKeys } from './static-cache.js';
import { originalPositions } from './window-mask.js';

export interface RouteOptions {
  gated: boolean;
}

/**
 * Per-token values computed from token inputs alone (rotary cos/sin of position_ids) are
 * recomputed from the gathered inputs, whatever their layout; others must be [batch, seq, ...].
 */
function fromTokenInputsOnly(model: Model, v: Value): boolean {
  const sources = graphInputsReached(model.graph, [v]);
  return sources.size > 0 && [...sources].every((s) => s.name === 'position_ids' || s.name === 'input_ids');
}

/**
 * What one routing rewrites: a whole layer (its output y is scattered into the stream) or a
 * sub-layer part (its update u is scattered into zeros).
 */
interface RoutedRegion {
  layer: LayerInfo;
  part: RoutedPart;
  /** The stream value the region reads, as analysed (before earlier layers were routed). */
  input: Value;
  nodes: Set<Node>;
  sideInputs: SideInput[];
  output: { kind: 'stream' | 'update'; value: Value };
  /** The region holds the attention core: its KV cache is compacted. */
  compactsKv: boolean;
}

/** The region of a layer part, or why it cannot be routed (found before anything is changed). */
function regionOf(model: Model, layer: LayerInfo, part: RoutedPart, facts: () => GraphFacts): RoutedRegion | { reason: string } {
  const core = coreNodes(layer.attention);
  if (part === 'block') {
    const inputs = [layer.residualIn, ...(layer.entryBoundary ? [layer.entryBoundary.normed] : [])];
    const why =
      blockBlocker(layer) ??
      kvCompactionBlocker(layer.attention) ??
      sideInputBlocker(model, layer.sideInputs) ??
      callerMaskBlocker(layer, layer.sideInputs) ??
      tokenCouplingBlocker(layer.nodes, { inputs, facts: facts(), exempt: core });
    if (why) return { reason: why };
    return {
      layer,
      part,
      input: layer.residualIn,
      nodes: new Set(layer.nodes.filter((n) => n.domain !== MODC_DOMAIN)),
      sideInputs: layer.sideInputs,
      output: { kind: 'stream', value: layer.residualOut! },
      compactsKv: true,
    };
  }
  // Like a block, no part of a layer with state besides the KV cache is routed (it stays dense).
  const stateful = layer.sideInputs.find((si) => si.kind === 'other');
  if (stateful) return { reason: `side input ${stateful.value} is not understood (${(stateful as { reason: string }).reason})` };
  const parts = subLayersOf(layer, new Set(model.graph.outputs));
  if ('reason' in parts) return { reason: `no sub-layer boundary: ${parts.reason}` };
  const sub = parts[part];
  const joinFused = sub.join.opType !== 'Add' || sub.join.domain !== '';
  const why =
    (joinFused
      ? `its ${part} update is added by ${sub.join.describe()}, not a plain Add (run split-fused-boundaries with within=${layer.index} first)`
      : null) ??
    sub.blocker ??
    (part === 'attention' ? kvCompactionBlocker(layer.attention) : null) ??
    sideInputBlocker(model, sub.sideInputs) ??
    callerMaskBlocker(layer, sub.sideInputs) ??
    tokenCouplingBlocker(sub.nodes, { inputs: [sub.input], facts: facts(), exempt: core }) ??
    (part === 'mlp' && sub.sideInputs.some((si) => si.kind !== 'weight')
      ? `its MLP reads ${sub.sideInputs.find((si) => si.kind !== 'weight')!.value}, which is not a weight`
      : null);
  if (why) return { reason: why };
  return {
    layer,
    part,
    input: sub.input,
    nodes: new Set(sub.nodes),
    sideInputs: sub.sideInputs,
    output: { kind: 'update', value: sub.update },
    compactsKv: part === 'attention',
  };
}

/** Why route-layers would leave this layer part dense, or null when it can route it. */
export function routeBlocker(model: Model, layer: LayerInfo, part: RoutedPart): string | null {
  let graphFacts: GraphFacts | undefined;
  const r = regionOf(model, layer, part, () => (graphFacts ??= new GraphFacts(model.graph)));
  return 'reason' in r ? r.reason : null;
}

function blockBlocker(layer: LayerInfo): string | null {
  if (!layer.residualOut) return `its residual add is fused into ${layer.exit.node.describe()} (run split-fused-boundaries first)`;
  if (layer.exit.node.opType !== 'Add') return `its exit ${layer.exit.node.describe()} is not a plain Add (run split-fused-boundaries first)`;
  return null;
}

/**
 * A caller's 4-D mask is gathered at the sequence indices of the keys an unfused attention lays
 * out as `Concat(cache, new)` (compiler/passes/caller-mask.ts); other attention forms order their
 * keys otherwise.
 */
function callerMaskBlocker(layer: LayerInfo, sideInputs: readonly SideInput[]): string | null {
  const mask = sideInputs.find((si) => si.kind === 'attention-mask' && si.form === 'caller-4d');
  if (!mask) return null;
  const a = layer.attention;
  if (a.form !== 'unfused' || isStaticLayout(a.kv.layout))
    return `it reads the caller's 4-D attention mask ${mask.value} with ${a.form} attention (${a.kv.layout} cache); modc gathers such a mask for unfused attention with a growing cache only`;
  return null;
}

/** Side inputs a routed region cannot take: not understood, or per-token in a layout that cannot be gathered. */
function sideInputBlocker(model: Model, sideInputs: readonly SideInput[]): string | null {
  for (const si of sideInputs) {
    if (si.kind === 'other') return `side input ${si.value} is not understood (${si.reason})`;
    if (si.kind === 'per-token' && !fromTokenInputsOnly(model, si.value) && (si.batchAxis !== 0 || si.sequenceAxis !== 1)) {
      return `per-token side input ${si.value} has batch axis ${si.batchAxis} and sequence axis ${si.sequenceAxis}; only [batch, sequence, ...] layouts (batch axis 0) can be gathered`;
    }
  }
  return null;
}

function graphAttribute(name: string): AttributeProto {
  return { name, type: AttributeType.GRAPH, floats: [], ints: [], strings: [], tensors: [], graphs: [], sparse_tensors: [], type_protos: [] } as AttributeProto;
}

/** The element type of a value, without shape (a branch output's declared type). */
function elementType(v: Value): TypeProto | undefined {
  const elem = v.dtype;
  return elem === undefined ? undefined : ({ tensor_type: { elem_type: elem } } as TypeProto);
}

function zeroTensor(dtype: number): Tensor {
  if (dtype === DataType.FLOAT16 || dtype === DataType.BFLOAT16) return Tensor.fromArray('', [1], Uint16Array.of(0), dtype);
  return Tensor.fromArray('', [1], Float32Array.of(0));
}

class LayerRouter {
  private readonly e: Emitter;
  private readonly region: Set<Node>;
  private readonly layer: LayerInfo;
  private readonly l: number;
  private readonly tag: string;

  /**
   * @param residualIn the value now carrying the region's input: the original, or the scatter
   *   output of the routed layer before it
   */
  constructor(
    private readonly model: Model,
    private readonly s: DecoderStructure,
    private readonly r: RoutedRegion,
    private readonly routing: LayerRouting,
    private readonly opts: RouteOptions,
    private readonly residualIn: Value,
  ) {
    this.layer = r.layer;
    this.l = r.layer.index;
    this.tag = r.part === 'block' ? `layer${this.l}` : `layer${this.l}/${r.part}`;
    this.e = new Emitter(model.graph, defaultOpset(model), `modc/${this.tag}/`);
    this.region = r.nodes;
  }

  private call(op: string, inputs: Value[], graph?: Graph): Value[] {
    return callModcOp(this.model, op, inputs, { dtype: streamElementType(this.s), name: `modc/${this.tag}`, graph });
  }

  /**
   * `If(cond)` in the main graph with branches built by the callbacks; returns its outputs,
   * typed like the then-branch's (element type only: shapes may differ between branches).
   */
  private ifElse(name: string, cond: Value, thenBranch: (g: Graph) => Value[], elseBranch: (g: Graph) => Value[], g: Graph = this.model.graph): Value[] {
    const branches = [new Graph(`${name}_then`, g), new Graph(`${name}_else`, g)] as const;
    branches[0].outputs = thenBranch(branches[0]);
    branches[1].outputs = elseBranch(branches[1]);
    const outs = branches[0].outputs.map((v) => g.newValue(`${v.name}_if`, elementType(v)));
    for (const b of branches) b.outputs.forEach((v) => (v.type ??= elementType(outs[b.outputs.indexOf(v)]!)));
    const node = g.addNode('If', [cond], outs, { name });
    node.setAttr(graphAttribute('then_branch'), branches[0]);
    node.setAttr(graphAttribute('else_branch'), branches[1]);
    return outs;
  }

  private readonly gathered = new Map<Value, Value>();
  /** The layer took the decode fast path (its cache appended outside its If). */
  appendsOutsideIf = false;

  /**
   * `v` at the selected tokens (one gather per value and layer). A [B, S] value (token ids,
   * positions, the gate) is GatherTokens' semantics in one standard kernel, GatherElements on
   * axis 1; others take GatherTokens.
   */
  private gather(v: Value, rank2 = v.shape?.length === 2): Value {
    let out = this.gathered.get(v);
    if (!out) {
      out = rank2 ? this.e.op('GatherElements', [v, this.routing.indices], { axis: 1 }) : this.call('GatherTokens', [v, this.routing.indices])[0]!;
      this.gathered.set(v, out);
    }
    return out;
  }

  private slotIndex?: Value;
  /** A caller's 4-D mask: the sequence index of each key slot this call ([B, P_l + K]) and its past input. */
  private slotSequence?: { past: Value; keys: Value };

  /**
   * A stream value ([B, S, H], the stream's float type) at the selected tokens: GatherTokens'
   * semantics as one GatherND with batch_dims 1 from opset 13 (its CUDA kernel covers the
   * float types from there), else GatherTokens.
   */
  private gatherStream(v: Value): Value {
    if (this.e.opset < 13) return this.gather(v, false);
    let out = this.gathered.get(v);
    if (!out) {
      this.slotIndex ??= this.e.unsqueeze(this.routing.indices, [2]);
      out = this.e.op('GatherND', [v, this.slotIndex], { batch_dims: 1 });
      this.gathered.set(v, out);
    }
    return out;
  }

  /**
   * Tokens selected per row, [B] int64, counted from `valid`: Compact's own `count` output read
   * inside an If branch makes ORT warn that it cannot rename it when inlining the function.
   */
  private selectedCount(): Value {
    return this.e.reduceSum(this.e.cast(this.routing.valid, DataType.INT64), [1], false);
  }

  /**
   * Rewrites the region; returns the value that now carries its output (the scatter of the
   * stream for a block, of the update for a part).
   */
  route(): Value {
    const { layer, routing, r } = this;
    const g = this.model.graph;
    const x = this.residualIn;
    // The skipped update is zero (built outside the If: the else branch passes it through).
    const zeros = r.output.kind === 'update' ? this.e.op('ConstantOfShape', [this.e.op('Shape', [x])], { value: zeroTensor(streamElementType(this.s)) }) : null;
    const existing = new Set(g.nodes);
    const y = r.output.value;
    const xSel = this.gatherStream(x);
    if (r.part === 'block' && layer.entryBoundary) replaceUsesWithin(this.region, layer.entryBoundary.normed, this.gatherStream(layer.entryBoundary.normed));
    replaceUsesWithin(this.region, x, xSel);

    const recompute: Value[] = [];
    const perToken: Value[] = [];
    for (const si of r.sideInputs) {
      if (si.kind === 'per-token') {
        if (fromTokenInputsOnly(this.model, si.value)) perToken.push(si.value);
        else replaceUsesWithin(this.region, si.value, this.gather(si.value));
      } else if (si.kind === 'attention-mask' || si.kind === 'sequence-length') {
        recompute.push(si.value);
      }
    }
    if (perToken.length) {
      // Original positions: the same computation on the selected tokens' own ids and positions.
      const tokens = new Map(g.inputs.filter((v) => v.name === 'position_ids' || v.name === 'input_ids').map((v) => [v, this.gather(v)]));
      const recomputed = recomputeWith(g, perToken, tokens, `_${this.suffix()}`);
      for (const v of perToken) replaceUsesWithin(this.region, v, recomputed.get(v)!);
    }

    const kv = r.compactsKv ? this.compactKv(xSel, recompute) : { pairs: [] };

    let scatter: Value;
    let passed: Value;
    if (r.output.kind === 'stream') {
      scatter = (
        this.opts.gated
          ? this.call('ScatterTokensGated', [x, routing.indices, routing.valid, xSel, y, this.gather(this.e.op('Sigmoid', [routing.score]), true)])
          : this.call('ScatterTokens', [x, routing.indices, routing.valid, xSel, y])
      )[0]!;
      passed = x;
    } else {
      const zerosSel = this.e.op('ConstantOfShape', [this.e.op('Shape', [y])], { value: zeroTensor(streamElementType(this.s)) });
      scatter = (
        this.opts.gated
          ? this.call('ScatterTokensGated', [zeros!, routing.indices, routing.valid, zerosSel, y, this.gather(this.e.op('Sigmoid', [routing.score]), true)])
          : this.call('ScatterTokens', [zeros!, routing.indices, routing.valid, zerosSel, y])
      )[0]!;
      passed = zeros!;
    }
    const layerNodes = () => new Set([...this.region, ...g.nodes.filter((n) => !existing.has(n))]);
    for (const use of [...y.uses]) if (!layerNodes().has(use.node)) use.node.setInput(use.index, scatter);
    if (g.outputs.includes(y)) g.outputs = g.outputs.map((v) => (v === y ? scatter : v));

    if ('appends' in kv) {
      const out = this.appendOutsideIf(layerNodes(), scatter, passed, kv.appends, kv.pastLength);
      if (out) {
        this.appendsOutsideIf = true;
        return out;
      }
      // A value the branches hand on has an element type no rule covers: the general structure.
      const pairs = this.packCompacted(kv.pastLength);
      return this.skipWhenNothingSelected(layerNodes(), [[scatter, passed], ...pairs]);
    }
    return this.skipWhenNothingSelected(layerNodes(), [[scatter, passed], ...kv.pairs]);
  }

  private suffix(): string {
    return this.r.part === 'block' ? `l${this.l}` : `l${this.l}${this.r.part === 'attention' ? 'a' : 'm'}`;
  }

  /**
   * The region's attention runs on this layer's own keys: masks and lengths recomputed, the
   * present caches re-packed, `past_lengths.l` in and `present_lengths.l` out. Returns the
   * [computed, passed when skipped] pairs for the If.
   */
  private compactKv(xSel: Value, recompute: Value[]): { pairs: [Value, Value][] } | { appends: KvAppend[]; pastLength: Value } {
    const { layer, routing } = this;
    const g = this.model.graph;
    const kv = layer.kv;
    // Static caches (TensorScatter buffers): compiler/passes/static-cache.ts.
    if (isStaticLayout(kv.layout)) {
      return {
        pairs: compactStaticCache({
          model: this.model,
          layer,
          e: this.e,
          region: this.region,
          selectedCount: () => this.selectedCount(),
          recompute,
          suffix: this.suffix(),
          tokens: () => this.e.dimScalar(routing.indices, 1),
          indices: routing.indices,
          stream: this.residualIn,
          call: (op, inputs) => this.call(op, inputs),
          substitutes: (pastLength, capacity) => this.substitutes(xSel, pastLength, capacity, this.e.dimScalar(routing.indices, 1), false),
        }),
      };
    }
    const pastKey = kv.key.input;
    const seqAxis = kv.layout === 'combined-2BHTD' ? 3 : 2;
    const pastLength = g.addInput(new Value(pastLengthName(this.l), tensorType(DataType.INT64, ['batch'])));
    const capacity = this.e.dimScalar(pastKey, seqAxis);
    const k = this.e.dimScalar(routing.indices, 1);
    const gqa = layer.attention.form === 'GroupQueryAttention';

    if (recompute.length) {
      const substitute = this.substitutes(xSel, pastLength, capacity, k, gqa);
      const recomputed = recomputeWith(g, recompute, substitute, `_${this.suffix()}`);
      for (const v of recompute) replaceUsesWithin(this.region, v, recomputed.get(v)!);
    }
    const appends = kvAppendsOf(layer, this.region);
    if (!('reason' in appends) && !this.slotSequence && this.region.size > 0 && ![...this.region].some((n) => n.subgraphs().length > 0))
      return { appends, pastLength };
    return { pairs: this.packCompacted(pastLength) };
  }

  /** The general structure: the presents re-packed inside the layer's If, with the lengths. */
  private packCompacted(pastLength: Value): [Value, Value][] {
    const { layer, routing } = this;
    const g = this.model.graph;
    const kv = layer.kv;
    const pastKey = kv.key.input;
    const seqAxis = kv.layout === 'combined-2BHTD' ? 3 : 2;
    const capacity = this.e.dimScalar(pastKey, seqAxis);
    const k = this.e.dimScalar(routing.indices, 1);
    const gqa = layer.attention.form === 'GroupQueryAttention';
    // Keep this layer's valid cache slots and this call's valid tokens, each row packed left.
    const keep = gqa
      ? this.call('PrefixMask', [this.e.op('Add', [pastLength, this.selectedCount()]), this.e.op('Add', [capacity, k])])[0]!
      : this.call('KeyMask', [pastLength, capacity, routing.valid])[0]!;
    // A standard Attention causal by is_causal=1 alone: its padding slots masked (compiler/passes/static-cache.ts).
    if (layer.attention.form === 'StandardAttention' && !layer.attention.node.input(3)) maskCompactedKeys(this.e, layer.attention.node, keep, k);
    const tensors: KvTensor[] = kv.layout === 'combined-2BHTD' ? [kv.key] : [kv.key, kv.value];
    const slots = this.slotSequence ? [{ keys: this.slotSequence.keys, name: presentSequenceIndicesName(this.l) }] : [];
    const [packed, packedSlots] = this.packPresent(tensors, keep, seqAxis, kv.layout === 'combined-2BHTD' ? 'GatherKvCombined' : 'GatherKv', slots);
    const presentLength = this.e.reduceSum(this.e.cast(keep, DataType.INT64), [1], false);
    presentLength.name = g.uniqueName(presentLengthName(this.l));
    presentLength.type = tensorType(DataType.INT64, ['batch']);
    g.outputs.push(presentLength);
    // GroupQueryAttention numbers rotary angles and its window by slot: back to original positions.
    const positions = originalPositions({
      graph: g,
      e: this.e,
      call: (op, inputs) => this.call(op, inputs),
      core: layer.attention,
      layer: this.l,
      tokens: this.residualIn,
      indices: routing.indices,
      pastLength,
      presentLength,
    });
    const sequence = packedSlots.map((p) => [p, this.slotSequence!.past] as [Value, Value]);
    return [...packed.map((p, i) => [p, tensors[i]!.input] as [Value, Value]), [presentLength, pastLength], ...positions, ...sequence];
  }

  /**
   * Puts the layer in `If(any token selected)`: when no row selects a token (a batch-1 decode
   * step the router skips) no node of the layer runs, and its outputs are its inputs. Also keeps
   * ORT away from the empty tensors a zero-token layer would make.
   * `pairs` are [value the layer computes, value passed through when skipped].
   */
  private skipWhenNothingSelected(nodes: ReadonlySet<Node>, pairs: [Value, Value][]): Value {
    const g = this.model.graph;
    g.toposort();
    const cond = this.e.op('Greater', [this.e.reduceSum(this.selectedCount(), [0], false), this.e.i64(0)]);
    const outs = this.ifElse(
      `modc/${this.tag}/if_selected`,
      cond,
      (run) => {
        g.moveNodesTo(nodes, run);
        return pairs.map(([computed]) => computed);
      },
      (skip) => pairs.map(([, passed]) => skip.addNode('Identity', [passed], [skip.newValue(`${passed.name}_skipped`)]).output(0)),
    );
    const run = outs[0]!.producer!.subgraphs()[0]!;
    pairs.forEach(([computed], i) => {
      const out = outs[i]!;
      for (const use of [...computed.uses]) if (use.node.graph !== run) use.node.setInput(use.index, out);
      if (g.outputs.includes(computed)) {
        // Graph outputs keep their names: the If output takes it over.
        const name = computed.name;
        computed.name = g.uniqueName(`${name}_run`);
        out.name = name;
        out.type = computed.type;
        g.outputs = g.outputs.map((v) => (v === computed ? out : v));
      }
    });
    return outs[0]!;
  }

  /**
   * The decode fast path for a cache appended by `Concat(past, new)` (docs/routing.md, "How a layer
   * is routed"). No full cache passes through an If branch or out of an If:
   *
   *   kv_new, v_new, h.. = If(any selected) { the nodes computing the new K/V from the selected
   *                          tokens } else { [B,H,0,D] slices of the past; empty stand-ins }
   *   present_lengths   = past_lengths + count                      (main graph)
   *   aligned           = every row keeps every slot of Concat(past, new)
   *   present           = If(aligned) { Concat(past, new) } else { GatherKv(Concat(past, new), Compact(keep)) }
   *   out               = If(any selected) { If(aligned) { rest of the layer, reading present }
   *                                          else { the same nodes on a local Concat(past, new) } }
   *                       else { x }
   *
   * At batch 1, and whenever all rows select alike, `present` is the one Concat the original
   * makes (computed into the If's output), and the layer's If returns only [B, S, H]. `h..` are
   * the values the new K/V nodes share with the rest of the layer (the normed input, rotary
   * tables). Returns the value carrying the layer's output, or null (graph unchanged) when a
   * shared value's element type is not known, so the else branch cannot stand in for it.
   */
  private appendOutsideIf(nodes: ReadonlySet<Node>, scatter: Value, passed: Value, appends: KvAppend[], pastLength: Value): Value | null {
    const g = this.model.graph;
    g.toposort();
    const order = g.nodes.filter((n) => nodes.has(n));
    const concats = new Set(appends.map((a) => a.concat));
    const rest = new Set(order.filter((n) => !concats.has(n)));
    const kvNodes = sliceWithin(
      appends.map((a) => a.fresh),
      rest,
      order,
    );
    const kvSet = new Set(kvNodes);
    const body = order.filter((n) => rest.has(n) && !kvSet.has(n));
    const bodySet = new Set(body);
    // Values the K/V nodes compute that the rest of the layer reads.
    const shared: Value[] = [];
    for (const n of kvNodes) for (const o of n.outputs) if ([...o.uses].some((u) => bodySet.has(u.node)) && !shared.includes(o)) shared.push(o);
    for (const n of kvNodes)
      for (const o of n.outputs) {
        if ([...o.uses].some((u) => !bodySet.has(u.node) && !kvSet.has(u.node) && !concats.has(u.node)) || g.outputs.includes(o)) return null;
      }
    const memo = new Map<Value, number | undefined>();
    const sharedTypes = shared.map((v) => elementTypeOf(v, memo));
    if (sharedTypes.some((t) => t === undefined)) return null;
    for (const a of appends) if ([...a.full.uses].some((u) => !bodySet.has(u.node))) return null;

    const tag = `modc/${this.tag}`;
    const count = this.selectedCount();
    const cond = this.e.op('Greater', [this.e.reduceSum(count, [0], false), this.e.i64(0)]);
    const seqAxis = 2;

    // 1. The new keys and values of the selected tokens; none when no row selects a token.
    const fresh = this.ifElse(
      `${tag}/kv_new`,
      cond,
      (run) => {
        g.moveNodesTo(kvSet, run);
        return [...appends.map((a) => a.fresh), ...shared];
      },
      (skip) => {
        const e = new Emitter(skip, this.e.opset, `${tag}/kv_none/`);
        const none = appends.map((a) => e.op('Slice', [a.past, e.i64([0]), e.i64([0]), e.i64([seqAxis])]));
        const standIns = sharedTypes.map((t) => e.constant(Tensor.fromBytes('', t! as DataTypeCode, [0], new Uint8Array(0))));
        return [...none, ...standIns];
      },
    );
    fresh.forEach((out, i) => {
      const inner = i < appends.length ? appends[i]!.fresh : shared[i - appends.length]!;
      out.type =
        inner.type ?? (i < appends.length ? elementType(appends[i]!.past) : ({ tensor_type: { elem_type: sharedTypes[i - appends.length]! } } as TypeProto));
      for (const use of [...inner.uses]) if (use.node.graph === g) use.node.setInput(use.index, out);
    });
    const freshKv = fresh.slice(0, appends.length);

    // 2. Lengths, and whether Concat(past, new) is already packed (every slot of every row kept).
    const presentLength = this.e.op('Add', [pastLength, count]);
    presentLength.name = g.uniqueName(presentLengthName(this.l));
    presentLength.type = tensorType(DataType.INT64, ['batch']);
    g.outputs.push(presentLength);
    // (The layer's own capacity value is one of its nodes, now inside its If: read it again here.)
    const capacity = this.e.dimScalar(appends[0]!.past, seqAxis);
    const appended = this.e.dimScalar(freshKv[0]!, seqAxis);
    const slots = this.e.op('Mul', [this.e.op('Size', [pastLength]), this.e.op('Add', [capacity, appended])]);
    const aligned = this.e.op('Equal', [this.e.reduceSum(presentLength, [0], false), slots]);

    // 3. The presents: the Concat itself when aligned, re-packed otherwise.
    const names = appends.map((a) => a.full.name);
    const types = appends.map((a) => withDim(a.full.type, seqAxis, `present_sequence_length_${this.l}`));
    for (const a of appends) {
      a.full.name = g.uniqueName(`${a.full.name}_full`);
      // A branch output declares its element type only (its length differs between branches).
      a.full.type = elementType(a.full);
    }
    const presents = this.ifElse(
      `${tag}/pack_cache`,
      aligned,
      (keepAll) => {
        g.moveNodesTo(concats, keepAll);
        return appends.map((a) => a.full);
      },
      (pack) => {
        const mapping = new Map<Value, Value>();
        pack.cloneNodes(
          appends.map((a) => a.concat),
          mapping,
          { suffix: '_packed' },
        );
        const e = new Emitter(pack, this.e.opset, `${tag}/pack/`);
        const valid = e.op('Slice', [this.routing.valid, e.unsqueeze(e.i64(0), [0]), e.unsqueeze(appended, [0]), e.i64([1])]);
        const keep = this.call('KeyMask', [pastLength, capacity, valid], pack)[0]!;
        const [kept] = this.call('Compact', [keep], pack);
        return appends.map((a) => this.call('GatherKv', [mapping.get(a.full)!, kept!], pack)[0]!);
      },
    );
    presents.forEach((out, i) => {
      const a = appends[i]!;
      out.name = names[i]!;
      out.type = types[i];
      g.outputs = g.outputs.map((v) => (v === a.full ? out : v));
      a.past.type = withDim(a.past.type, seqAxis, `past_sequence_length_${this.l}`);
    });

    // 4. The rest of the layer, reading the present by reference (or a local Concat when re-packed).
    const outs = this.ifElse(
      `${tag}/if_selected`,
      cond,
      (run) =>
        this.ifElse(
          `${tag}/attend`,
          aligned,
          (packed) => {
            for (const n of body)
              n.inputs.forEach((v, j) => {
                const k = appends.findIndex((a) => a.full === v);
                if (k >= 0) n.setInput(j, presents[k]!);
              });
            g.moveNodesTo(bodySet, packed);
            return [scatter];
          },
          (unpacked) => {
            const mapping = new Map<Value, Value>();
            unpacked.cloneNodes(
              appends.map((a) => a.concat),
              mapping,
              { suffix: '_attend' },
            );
            presents.forEach((p, k) => mapping.set(p, mapping.get(appends[k]!.full)!));
            unpacked.cloneNodes(body, mapping, { suffix: '_unpacked' });
            return [mapping.get(scatter)!];
          },
          run,
        ),
      (skip) => [skip.addNode('Identity', [passed], [skip.newValue(`${passed.name}_skipped`)]).output(0)],
    );
    const out = outs[0]!;
    out.type = elementType(passed) ?? ({ tensor_type: { elem_type: streamElementType(this.s) } } as TypeProto);
    const inner = new Set<Node>([...g.allNodes()].filter((n) => n.graph !== g));
    for (const use of [...scatter.uses]) if (!inner.has(use.node)) use.node.setInput(use.index, out);
    if (g.outputs.includes(scatter)) {
      const name = scatter.name;
      scatter.name = g.uniqueName(`${name}_run`);
      out.name = name;
      out.type = scatter.type;
      g.outputs = g.outputs.map((v) => (v === scatter ? out : v));
    }
    return out;
  }

  /** What the shared mask / length builders read, in this layer's terms. */
  private substitutes(xSel: Value, pastLength: Value, capacity: Value, k: Value, gqa: boolean): Map<Value, Value> {
    const g = this.model.graph;
    const { routing } = this;
    const sub = new Map<Value, Value>();
    const mask = g.inputs.find((v) => v.name === 'attention_mask');
    const caller = callerMask(g);
    if (caller) {
      // The caller's entries at each key slot's original sequence index (compiler/passes/caller-mask.ts).
      const fresh = this.e.op('Add', [this.e.unsqueeze(sequenceLengthInput(this.model, this.e), [1]), routing.indices]);
      const past = g.addInput(new Value(pastSequenceIndicesName(this.l), tensorType(DataType.INT64, ['batch', `past_sequence_length_${this.l}`])));
      const keys = this.e.op('Concat', [past, fresh], { axis: 1 });
      const valid = this.call('KeyMask', [pastLength, capacity, routing.valid])[0]!;
      sub.set(caller, this.call('GatherMask', [caller, keys, keys, valid, maskFill(this.e, caller)])[0]!);
      this.slotSequence = { past, keys };
    } else if (mask) {
      const keys = gqa
        ? this.call('PrefixMask', [this.e.op('Add', [pastLength, k]), this.e.op('Add', [capacity, k])])[0]!
        : this.call('KeyMask', [pastLength, capacity, routing.valid])[0]!;
      sub.set(mask, this.e.cast(keys, mask.dtype ?? DataType.INT64));
    }
    for (const name of ['input_ids', 'position_ids']) {
      const v = g.inputs.find((i) => i.name === name);
      if (v) sub.set(v, this.gather(v));
    }
    for (const stream of [this.s.embedding.output, ...this.s.steps.flatMap((st) => [st.sum, st.carried])]) if (stream) sub.set(stream, xSel);
    // Lengths read off another layer's cache mean "the past length": use this layer's own.
    for (const other of this.s.layers) {
      if (other === this.layer) continue;
      sub.set(other.kv.key.input, this.layer.kv.key.input);
      sub.set(other.kv.value.input, this.layer.kv.value.input);
    }
    return sub;
  }

  /**
   * The present graph outputs become the re-packed caches (the op's own presents feed only
   * them). Packing copies the whole cache, so it runs only when some slot must go: a batch-1
   * step or an all-selected prefill keeps every slot, and then the present passes through.
   * `slots` are [B, P_l + K] values indexed by key slot, packed the same way into new graph
   * outputs named `name`. Returns the packed presents and the packed slot values.
   */
  private packPresent(tensors: KvTensor[], keep: Value, seqAxis: number, op: string, slots: { keys: Value; name: string }[] = []): [Value[], Value[]] {
    const g = this.model.graph;
    const fulls = tensors.map((t) => {
      const full = t.output;
      const name = full.name;
      full.name = g.uniqueName(`${name}_full`);
      return { t, full, name };
    });
    const kept = this.e.reduceSum(this.e.cast(keep, DataType.INT64), [0, 1], false);
    const everySlotKept = this.e.op('Equal', [kept, this.e.op('Size', [keep])]);
    const packed = this.ifElse(
      `modc/${this.tag}/pack_cache`,
      everySlotKept,
      (branch) =>
        [...fulls.map(({ full }) => full), ...slots.map((s) => s.keys)].map((v) =>
          branch.addNode('Identity', [v], [branch.newValue(`${v.name}_kept`)]).output(0),
        ),
      (branch) => {
        const [kept] = this.call('Compact', [keep], branch);
        const e = new Emitter(branch, this.e.opset, `modc/${this.tag}/pack/`);
        return [
          ...fulls.map(({ full }) => this.call(op, [full, kept!], branch)[0]!),
          ...slots.map((s) => e.op('GatherElements', [s.keys, kept!], { axis: 1 })),
        ];
      },
    );
    const packedSlots = slots.map((s, i) => {
      const out = packed[fulls.length + i]!;
      out.name = g.uniqueName(s.name);
      out.type = tensorType(DataType.INT64, ['batch', `present_sequence_length_${this.l}`]);
      g.outputs.push(out);
      return out;
    });
    const presents = fulls.map(({ t, full, name }, i) => {
      const out = packed[i]!;
      out.name = name;
      out.type = withDim(full.type, seqAxis, `present_sequence_length_${this.l}`);
      g.outputs = g.outputs.map((v) => (v === full ? out : v));
      t.input.type = withDim(t.input.type, seqAxis, `past_sequence_length_${this.l}`);
      return out;
    });
    return [presents, packedSlots];
  }
}

export interface RouteReport {
  /** `appendsOutsideIf`: the layer's cache is appended outside its If (the decode fast path). */
  routed: { layer: number; part: RoutedPart; appendsOutsideIf: boolean }[];
  /** `part` absent for a whole block. */
  skipped: { layer: number; part?: RoutedPart; reason: string }[];
}

/**
 * The last layer (or the suffix, index L) holding a node that couples tokens (a reduction over
 * the token or batch axis, dynamic quantization: compiler/analysis/token-coupling.ts), with the
 * reason every layer up to it must stay dense. A routed layer leaves the tokens it skips
 * unchanged, padding included, where the original processed them; a later node taking a
 * statistic over the tokens would read those values, so even every-token routing would not
 * reproduce the original.
 */
function lastTokenCoupling(s: DecoderStructure, facts: GraphFacts): { layer: number; reason: string } | null {
  const last = s.layers.at(-1);
  const end = s.final.residual ?? last?.exitBoundary?.normed;
  const suffix = end ? tokenCouplingBlocker(s.suffixNodes, { inputs: [end], facts, exempt: [], paddingMask: s.mask.inputs }) : null;
  if (suffix)
    return { layer: s.layers.length, reason: `the model couples tokens after its last layer: ${suffix}; routing any layer would change what that node reads` };
  for (const l of [...s.layers].reverse()) {
    const inputs = [l.residualIn, ...(l.entryBoundary ? [l.entryBoundary.normed] : [])];
    const why = tokenCouplingBlocker(l.nodes, { inputs, facts, exempt: coreNodes(l.attention) });
    if (why) return { layer: l.index, reason: `layer ${l.index} couples tokens: ${why}; routing it or a layer before it would change what that node reads` };
  }
  return null;
}

export function routeLayers(model: Model, opts: RouteOptions, s: DecoderStructure = analyzeDecoder(model)): RouteReport {
  const meta = readRoutingMetadata(model);
  const report: RouteReport = { routed: [], skipped: [] };
  const plans: [RoutedRegion, LayerRouting][] = [];
  let graphFacts: GraphFacts | undefined;
  const facts = () => (graphFacts ??= new GraphFacts(model.graph));
  let coupling: { layer: number; reason: string } | undefined;
  for (const entry of meta?.layers ?? []) {
    const selected = entry.selected ? model.graph.findValue(entry.selected) : undefined;
    const routing = selected ? routingOf(selected) : null;
    const layer = s.layers[entry.layer];
    if (!routing || !layer)
      throw new ModcError(
        `route-layers: the routing metadata names ${entry.selected ? `selection ${entry.selected}` : 'no selection value'} for layer ${describeLayerPart(entry)}, which the graph does not compute (run insert-routers first)`,
      );
    // Every layer up to the last that couples tokens stays dense.
    coupling ??= lastTokenCoupling(s, facts()) ?? { layer: -1, reason: '' };
    const region: RoutedRegion | { reason: string } = entry.layer > coupling.layer ? regionOf(model, layer, entry.part, facts) : { reason: coupling.reason };
    if ('reason' in region) {
      report.skipped.push({ layer: entry.layer, ...(entry.part !== 'block' ? { part: entry.part } : {}), reason: region.reason });
      for (const n of routing.nodes.reverse()) model.graph.removeNode(n, true);
      continue;
    }
    plans.push([region, routing]);
  }
  // Routing layer l replaces its output downstream; layer l+1 then reads the scatter.
  const carried = new Map<Value, Value>();
  for (const [region, routing] of plans) {
    const input = carried.get(region.input) ?? region.input;
    const router = new LayerRouter(model, s, region, routing, opts, input);
    const out = router.route();
    if (region.output.kind === 'stream') carried.set(region.output.value, out);
    report.routed.push({ layer: region.layer.index, part: region.part, appendsOutsideIf: router.appendsOutsideIf });
  }
  model.graph.toposort();
  if (meta) {
    writeRoutingMetadata(model, {
      ...meta,
      gated: opts.gated,
      layers: meta.layers.filter((l) => report.routed.some((r) => r.layer === l.layer && r.part === l.part)),
      ...(report.skipped.length ? { skipped: report.skipped } : {}),
    });
  }
  return report;
}

export function routeLayersPass(opts: RouteOptions): Pass {
  return {
    name: 'route-layers',
    description: 'run each routed layer on its selected tokens only, with a compacted KV cache',
    run(model, _options, ctx) {
      const r = routeLayers(model, opts, ctx.structure());
      if (r.routed.length === 0 && r.skipped.length === 0) throw new ModcError('no routers found: run insert-routers first');
      return {
        changed: r.routed.length > 0,
        notes: [
          ...(r.routed.length ? [`routed layers ${r.routed.map(describeLayerPart).join(', ')} (${opts.gated ? 'gated' : 'ungated'})`] : []),
          ...(r.routed.some((x) => x.appendsOutsideIf)
            ? [
                `KV cache appended outside the layer's If (decode fast path): ${r.routed
                  .filter((x) => x.appendsOutsideIf)
                  .map(describeLayerPart)
                  .join(', ')}`,
              ]
            : []),
          ...r.skipped.map((sk) => `layer ${describeLayerPart({ layer: sk.layer, part: sk.part ?? 'block' })} not converted: ${sk.reason}`),
        ],
      };
    },
  };
}
