/**
 * What a model's decode step asks of a GPU runtime, computed statically from the graph (no
 * session, no weights read): `modc inspect` prints it (`gpuReadiness` in --json).
 *
 * - The If nodes: every If of the main graph is evaluated on every call, and an If inside a
 *   branch when that branch runs. Each If's condition is a value the CUDA execution provider
 *   copies to the host before it can pick a branch, and control flow rules out CUDA graph capture.
 * - Host reads: inputs whose values set an output's shape, computed on the device. A value is
 *   host-computable when it comes from initializers, Constant nodes, Shape/Size and ops on such
 *   values only (ORT's CUDA EP keeps those shape chains on the CPU). Flagged: NonZero, Unique,
 *   Compress, Loop, Scan (their output shapes depend on data), the condition of an If, and the
 *   shape inputs of Reshape, Expand, Tile, Range, Slice, ConstantOfShape, TopK, OneHot, Pad,
 *   Resize, Squeeze, Unsqueeze, Reduce*, Split (and GroupQueryAttention's total_sequence_length)
 *   when they are not host-computable. Each is a device-to-host copy (a synchronisation) per
 *   call on CUDA and a bar to CUDA graph capture.
 * - Kernels per converted layer: the nodes (Constants excluded) a decode step runs for the
 *   layer's routing, on the path where the layer selects the token and where it skips it.
 *   Nodes belong to a layer by the names route-layers gives them (`modc/layerN/...`,
 *   `modc.selected.N`, `present_lengths.N`); an If and everything in it to the If's layer.
 *   Paths: an If whose condition is `x > 0` ("any token selected", the one If route-layers gives
 *   a converted part) takes its then branch when the layer selects and its else branch when it
 *   skips; every other If takes its then branch.
 * - Weights consumed two or more If levels below the graph that holds their initializer:
 *   ONNX Runtime prepacks a constant weight only for a node in the initializer's graph or one
 *   level below, so these run unpacked on the CPU (slower MatMuls). Should be none.
 *
 * modc ops (model-local functions) are inlined first, as ONNX Runtime does.
 */
import { cloneModel } from '../../core/io/convert.js';
import type { Graph, Node, Value } from '../../core/ir/graph.js';
import type { Model } from '../../core/ir/model.js';
import { Tensor } from '../../core/ir/tensor.js';
import { decoderIo } from '../../metadata/decoder-io.js';
import { inlineModcOps } from '../../passes/inline-modc-ops.js';
import { DECODE_STEP_IF } from '../../passes/modc-ops/op-bodies.js';
import { ONE_TOKEN_IF } from '../../passes/one-token-path.js';
import type { RoutedPart } from '../../routing/routing-plan.js';

export type HostReadReason = 'If condition' | 'data-dependent output shape' | 'shape input computed on the device';

export interface HostRead {
  node: string;
  op: string;
  /** The input whose value the host needs (null: the op's output shape itself depends on data). */
  input: number | null;
  value: string | null;
  why: HostReadReason;
  /** If levels above the node (0: the main graph). */
  depth: number;
  layer: number | null;
}

export interface IfReport {
  name: string;
  /** If levels above this If (0: in the main graph). */
  depth: number;
  layer: number | null;
  part: RoutedPart | null;
  condition: {
    value: string;
    /** The condition's producer, e.g. "Greater(ReduceSum, 0)". */
    expression: string;
    /**
     * 'any selected': `x > 0`, taken (then) when the layer selects a token; 'decode step': a
     * top-k selection's test for a one-token step with a past (then: the threshold test);
     * 'one token': a routed layer's test for a batch-1 call of one token (then: no compaction),
     * read off shapes only.
     */
    kind: 'any selected' | 'decode step' | 'one token' | 'other';
  };
  /** Nodes directly in each branch (nested Ifs count as one; they are listed themselves). */
  branches: { then: { nodes: number; ifs: number }; else: { nodes: number; ifs: number } };
}

/** What one path through the graph runs. */
export interface PathCount {
  /** Nodes run, Constants and If nodes excluded. */
  kernels: number;
  /** If nodes evaluated. */
  ifs: number;
  /** Host reads on the path (If conditions included). */
  hostReads: number;
}

export interface LayerReadiness {
  layer: number;
  parts: RoutedPart[];
  /** The layer's decode step when it selects the token, and when it skips it. */
  selected: PathCount;
  skipped: PathCount;
  /** Its Ifs, nested ones included. */
  ifs: number;
  /** Deepest If nesting in the layer (1: its Ifs are in the main graph only). */
  maxIfDepth: number;
}

export interface DeepWeight {
  node: string;
  op: string;
  weight: string;
  bytes: number;
  /** If levels between the initializer's graph and the node. */
  levelsBelow: number;
}

export interface GpuReadiness {
  /** Static facts of one decode step: computed from the graph, the same for every context length. */
  decodeStep: {
    ifs: IfReport[];
    hostReads: HostRead[];
    /** The whole step with every converted layer selecting its token, and with every one skipping it. */
    allSelected: PathCount;
    allSkipped: PathCount;
    cudaGraphCapturable: boolean;
    cudaGraphBlockers: string[];
  };
  kernelsPerConvertedLayer: LayerReadiness[];
  /** Outside the converted layers: the routing shared by all layers (token mask, past length) and the rest of the model. */
  outsideLayers: { sharedRouting: number; model: number };
  weightsBelowOneIfLevel: { uses: number; bytes: number; weights: DeepWeight[] };
}

/** Ops whose output shape depends on the values of their inputs (no input is "the" shape). */
const DATA_DEPENDENT = new Set(['NonZero', 'Unique', 'Compress', 'Loop', 'Scan', 'NonMaxSuppression', 'StringSplit']);

/** Op -> the input indices whose values set the output shape. */
const SHAPE_INPUTS: Record<string, number[]> = {
  Reshape: [1],
  Expand: [1],
  Tile: [1],
  Range: [0, 1, 2],
  Slice: [1, 2, 3, 4],
  ConstantOfShape: [0],
  TopK: [1],
  OneHot: [1],
  Pad: [1],
  Resize: [2, 3],
  Upsample: [1],
  Squeeze: [1],
  Unsqueeze: [1],
  ReduceSum: [1],
  ReduceMax: [1],
  ReduceMin: [1],
  ReduceMean: [1],
  ReduceProd: [1],
  ReduceL2: [1],
  Split: [1],
  CenterCropPad: [1],
  GroupQueryAttention: [6],
};

/** Outputs known on the host whatever the inputs hold. */
const SHAPE_OPS = new Set(['Shape', 'Size']);

/** Ops ONNX Runtime's CPU EP prepacks a constant weight input of. */
export const WEIGHT_OPS = new Set([
  'MatMul',
  'Gemm',
  'FusedMatMul',
  'MatMulNBits',
  'MatMulInteger',
  'MatMulIntegerToFloat',
  'DynamicQuantizeMatMul',
  'QLinearMatMul',
  'QGemm',
  'Attention',
  'QAttention',
  'Conv',
  'QLinearConv',
  'LSTM',
  'GRU',
]);

const LAYER_TAGS = [/modc\/layer(\d+)(?:\/(attention|mlp))?(?![\d])/, /modc\.selected\.(\d+)(?:\.(attn|mlp))?(?![\d])/, /^present_lengths\.(\d+)$/];

/** The converted layer (and part) a main-graph node belongs to by its name or outputs' names; null when none. */
export function layerTag(n: Node): { layer: number; part: RoutedPart | null } | null {
  for (const name of [n.name, ...n.outputs.map((o) => o.name)]) {
    for (const re of LAYER_TAGS) {
      const m = re.exec(name);
      if (m) return { layer: Number(m[1]), part: m[2] === 'attention' || m[2] === 'attn' ? 'attention' : m[2] === 'mlp' ? 'mlp' : null };
    }
  }
  return null;
}

const isModcShared = (n: Node) => [n.name, ...n.outputs.map((o) => o.name)].some((s) => s.startsWith('modc/'));

/** The numbers of a small constant value (an initializer or a Constant node's tensor); null otherwise. */
function smallConstant(v: Value | null): number[] | null {
  if (!v) return null;
  if (v.initializer && !v.initializer.isExternal && v.initializer.size <= 16) return v.initializer.toNumbers();
  const p = v.producer;
  const t = p?.opType === 'Constant' ? p.attr('value')?.t : undefined;
  if (t) {
    const tensor = new Tensor(t);
    return tensor.size <= 16 ? tensor.toNumbers() : null;
  }
  return null;
}

function describeCondition(n: Node): IfReport['condition'] {
  const cond = n.input(0)!;
  const p = cond.producer;
  if (n.name.includes(DECODE_STEP_IF)) return { value: cond.name, expression: p ? p.opType : cond.name, kind: 'decode step' };
  if (n.name.includes(ONE_TOKEN_IF)) return { value: cond.name, expression: p ? p.opType : cond.name, kind: 'one token' };
  if (!p) return { value: cond.name, expression: cond.name, kind: 'other' };
  const arg = (v: Value | null) => {
    const c = smallConstant(v);
    if (c && c.length === 1) return String(c[0]);
    return v?.producer?.opType ?? v?.name ?? '-';
  };
  const expression = `${p.opType}(${p.inputs.map(arg).join(', ')})`;
  const zero = smallConstant(p.input(1));
  const anySelected = p.opType === 'Greater' && zero !== null && zero.length === 1 && zero[0] === 0;
  return { value: cond.name, expression, kind: anySelected ? 'any selected' : 'other' };
}

function depthOf(g: Graph): number {
  let d = 0;
  for (let p = g.parent; p; p = p.parent) d++;
  return d;
}

/**
 * The GPU-readiness facts of `model` (not changed: modc ops are inlined in a copy).
 * `routedLayers`: the converted layers and parts (the modc.routing metadata); empty for an original.
 */
export function gpuReadiness(model: Model, routedLayers: readonly { layer: number; part: RoutedPart }[] = []): GpuReadiness {
  const m = model.functions.length ? cloneModel(model) : model;
  if (m !== model) inlineModcOps(m);
  const main = m.graph;

  // Host-computable values, and every flagged host read, over all graphs.
  const hostable = new Set<Value>();
  const hostReads: HostRead[] = [];
  const readsOf = new Map<Node, HostRead[]>();
  const ifs: IfReport[] = [];
  const deep: DeepWeight[] = [];
  const layerOfNode = new Map<Node, number | null>();
  const flag = (n: Node, r: Omit<HostRead, 'node' | 'op' | 'depth' | 'layer'>, depth: number, layer: number | null) => {
    const read: HostRead = { node: n.name || n.outputs[0]?.name || n.opType, op: n.opType, depth, layer, ...r };
    hostReads.push(read);
    readsOf.set(n, [...(readsOf.get(n) ?? []), read]);
  };
  const visit = (g: Graph, topLayer: number | null, topPart: RoutedPart | null) => {
    const depth = depthOf(g);
    for (const v of g.initializers.values()) hostable.add(v);
    for (const n of g.nodes) {
      const tag = depth === 0 ? layerTag(n) : null;
      const layer = depth === 0 ? (tag?.layer ?? null) : topLayer;
      const part = depth === 0 ? (tag?.part ?? (layer !== null ? partOfLayer(routedLayers, layer) : null)) : topPart;
      layerOfNode.set(n, layer);
      const ins = n.inputs.filter((v): v is Value => v !== null && v.name !== '');
      const control = n.subgraphs().length > 0;
      if (
        n.opType === 'Constant' ||
        SHAPE_OPS.has(n.opType) ||
        (!control && !DATA_DEPENDENT.has(n.opType) && !WEIGHT_OPS.has(n.opType) && ins.length > 0 && ins.every((v) => hostable.has(v)))
      ) {
        for (const o of n.outputs) hostable.add(o);
      }
      if (DATA_DEPENDENT.has(n.opType)) flag(n, { input: null, value: null, why: 'data-dependent output shape' }, depth, layer);
      if (n.opType === 'If') {
        const cond = n.input(0)!;
        if (!hostable.has(cond)) flag(n, { input: 0, value: cond.name, why: 'If condition' }, depth, layer);
        const [thenG, elseG] = [n.attributes.get('then_branch')?.graph, n.attributes.get('else_branch')?.graph];
        const count = (b: Graph | undefined) => ({ nodes: b?.nodes.length ?? 0, ifs: b?.nodes.filter((x) => x.opType === 'If').length ?? 0 });
        ifs.push({
          name: n.name,
          depth,
          layer,
          part,
          condition: describeCondition(n),
          branches: { then: count(thenG), else: count(elseG) },
        });
      }
      const shapeInputs = SHAPE_INPUTS[n.opType];
      if (shapeInputs) {
        for (const i of shapeInputs) {
          const v = n.input(i);
          if (v && v.name !== '' && !hostable.has(v)) {
            flag(
              n,
              {
                input: i,
                value: v.name,
                why: n.opType === 'TopK' || n.opType === 'Range' ? 'data-dependent output shape' : 'shape input computed on the device',
              },
              depth,
              layer,
            );
            break;
          }
        }
      }
      if (WEIGHT_OPS.has(n.opType)) {
        for (const v of n.inputs) {
          if (!v?.initializer) continue;
          const levels = depth - depthOf(v.graph ?? main);
          if (levels >= 2) deep.push({ node: n.name, op: n.opType, weight: v.name, bytes: v.initializer.byteLength, levelsBelow: levels });
        }
      }
      for (const sg of n.subgraphs()) visit(sg, layer, part);
    }
  };
  visit(main, null, null);

  // Paths: which branch each If takes when its layer selects / skips.
  const ifKind = new Map<Node, IfReport['condition']['kind']>();
  for (const n of main.allNodes()) if (n.opType === 'If') ifKind.set(n, describeCondition(n).kind);
  const walk = (g: Graph, selected: (layer: number | null) => boolean, into: (layer: number | null) => PathCount) => {
    for (const n of g.nodes) {
      const layer = layerOfNode.get(n) ?? null;
      const c = into(layer);
      c.hostReads += readsOf.get(n)?.length ?? 0;
      if (n.opType === 'If') {
        c.ifs++;
        const takeThen = ifKind.get(n) !== 'any selected' || selected(layer);
        const branch = n.attributes.get(takeThen ? 'then_branch' : 'else_branch')?.graph;
        if (branch) walk(branch, selected, into);
      } else if (n.opType !== 'Constant') c.kernels++;
    }
  };
  const zero = (): PathCount => ({ kernels: 0, ifs: 0, hostReads: 0 });
  const routed = [...new Set(routedLayers.map((r) => r.layer))].sort((a, b) => a - b);
  const tagged = [...new Set([...layerOfNode.values()].filter((l): l is number => l !== null))];
  const layers = [...new Set([...routed, ...tagged])].sort((a, b) => a - b);
  const perLayer = (sel: boolean) => {
    const counts = new Map<number | null, PathCount>();
    walk(
      main,
      () => sel,
      (l) => {
        let c = counts.get(l);
        if (!c) counts.set(l, (c = zero()));
        return c;
      },
    );
    return counts;
  };
  const whenSelected = perLayer(true);
  const whenSkipped = perLayer(false);
  const sum = (counts: Map<number | null, PathCount>) =>
    [...counts.values()].reduce((a, c) => ({ kernels: a.kernels + c.kernels, ifs: a.ifs + c.ifs, hostReads: a.hostReads + c.hostReads }), zero());
  const ifDepth = (l: number) => Math.max(0, ...ifs.filter((x) => x.layer === l).map((x) => x.depth + 1));

  let sharedRouting = 0;
  let other = 0;
  for (const n of main.nodes) {
    if (layerOfNode.get(n) !== null || n.opType === 'Constant') continue;
    if (isModcShared(n)) sharedRouting++;
    else other++;
  }

  const blockers: string[] = [];
  const ifCount = ifs.length;
  if (ifCount) blockers.push(`control flow: ${ifCount} If node${ifCount === 1 ? '' : 's'}`);
  const loops = [...main.allNodes()].filter((n) => n.opType === 'Loop' || n.opType === 'Scan').length;
  if (loops) blockers.push(`control flow: ${loops} Loop/Scan node${loops === 1 ? '' : 's'}`);
  const shapeReads = hostReads.filter((r) => r.why !== 'If condition').length;
  if (shapeReads) blockers.push(`data-dependent shapes: ${shapeReads} host read${shapeReads === 1 ? '' : 's'} besides If conditions`);
  if (growingCache(m)) blockers.push('growing KV cache: past inputs with a symbolic length, so buffer shapes change every step');

  const deepBytes = deep.reduce((a, d) => a + d.bytes, 0);
  return {
    decodeStep: {
      ifs,
      hostReads,
      allSelected: sum(whenSelected),
      allSkipped: sum(whenSkipped),
      cudaGraphCapturable: blockers.length === 0,
      cudaGraphBlockers: blockers,
    },
    kernelsPerConvertedLayer: layers.map((l) => ({
      layer: l,
      parts: routedLayers.filter((r) => r.layer === l).map((r) => r.part),
      selected: whenSelected.get(l) ?? zero(),
      skipped: whenSkipped.get(l) ?? zero(),
      ifs: ifs.filter((x) => x.layer === l).length,
      maxIfDepth: ifDepth(l),
    })),
    outsideLayers: { sharedRouting, model: other },
    weightsBelowOneIfLevel: { uses: deep.length, bytes: deepBytes, weights: deep },
  };
}

function partOfLayer(routed: readonly { layer: number; part: RoutedPart }[], layer: number): RoutedPart | null {
  const parts = routed.filter((r) => r.layer === layer);
  return parts.length === 1 ? parts[0]!.part : null;
}

/** Whether the model's KV inputs have a symbolic sequence length (a cache that grows by concatenation). */
function growingCache(m: Model): boolean {
  let io;
  try {
    io = decoderIo(m);
  } catch {
    return false;
  }
  const inputs = new Map(m.graph.inputs.map((v) => [v.name, v]));
  return io.kv.some((b) => {
    if (b.layout === 'static-BTH' || b.layout === 'static-BHTD') return false;
    const shape = inputs.get(b.pastKey)?.shape;
    const axis = b.layout === 'combined-2BHTD' ? 3 : 2;
    return !shape || typeof shape[axis] !== 'number';
  });
}

/** The short text section `modc inspect` prints. */
export function formatGpuReadiness(r: GpuReadiness): string {
  const s = r.decodeStep;
  const mib = (b: number) => `${(b / 2 ** 20).toFixed(1)} MiB`;
  const path = (c: PathCount) => `${c.kernels} kernels, ${c.ifs} If, ${c.hostReads} host reads`;
  const lines = ['gpu readiness (one decode step, from the graph; see docs "CUDA")'];
  const maxDepth = Math.max(0, ...s.ifs.map((x) => x.depth + 1));
  const kinds: [IfReport['condition']['kind'], string][] = [
    ['any selected', '"any token selected"'],
    ['decode step', '"one-token step"'],
    ['one token', '"one-token call"'],
    ['other', 'other conditions'],
  ];
  const byKind = kinds.flatMap(([k, what]) => {
    const n = s.ifs.filter((x) => x.condition.kind === k).length;
    return n ? [`${n} on ${what}`] : [];
  });
  lines.push(`  If nodes      ${s.ifs.length}${s.ifs.length ? ` (nested ${maxDepth} deep; ${byKind.join(', ')})` : ''}`);
  const reasons = new Map<string, number>();
  for (const h of s.hostReads) reasons.set(h.why, (reasons.get(h.why) ?? 0) + 1);
  lines.push(
    `  host reads    ${s.hostReads.length} in the graph${reasons.size ? ` (${[...reasons].map(([k, v]) => `${v} ${k}`).join(', ')})` : ''}${
      r.kernelsPerConvertedLayer.length
        ? `; per step: ${s.allSelected.hostReads} with every converted layer selecting, ${s.allSkipped.hostReads} with every one skipping`
        : ''
    }`,
  );
  lines.push(
    `  CUDA graphs   ${s.cudaGraphCapturable ? 'capturable (no control flow, no host reads, fixed shapes)' : `not capturable: ${s.cudaGraphBlockers.join('; ')}`}`,
  );
  lines.push(
    r.kernelsPerConvertedLayer.length
      ? `  decode step   every converted layer selecting: ${path(s.allSelected)}; every one skipping: ${path(s.allSkipped)}`
      : `  decode step   ${path(s.allSelected)}`,
  );
  if (r.kernelsPerConvertedLayer.length) {
    const ks = r.kernelsPerConvertedLayer;
    const same = ks.every((k) => k.selected.kernels === ks[0]!.selected.kernels && k.skipped.kernels === ks[0]!.skipped.kernels && k.ifs === ks[0]!.ifs);
    if (same)
      lines.push(
        `  per layer     ${ks.length} converted layer${ks.length === 1 ? '' : 's'}, each: selected ${path(ks[0]!.selected)}; skipped ${path(ks[0]!.skipped)}; ${ks[0]!.ifs} If (nested ${ks[0]!.maxIfDepth} deep)`,
      );
    else
      for (const k of ks)
        lines.push(`  layer ${String(k.layer).padEnd(7)} selected ${path(k.selected)}; skipped ${path(k.skipped)}; ${k.ifs} If (nested ${k.maxIfDepth} deep)`);
  }
  const w = r.weightsBelowOneIfLevel;
  lines.push(
    `  deep weights  ${w.uses ? `${w.uses} weight uses (${mib(w.bytes)}) two or more If levels below their initializer: ORT's CPU EP runs them unpacked` : 'none two or more If levels below their initializer'}`,
  );
  return lines.join('\n');
}
