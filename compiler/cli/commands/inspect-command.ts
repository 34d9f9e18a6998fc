/** `modc inspect`: what a model is (and, for a decoder, its layers), as text or JSON. */
import { analyzeDecoder } from '../../analysis/analyze.js';
import { formatGpuReadiness, gpuReadiness } from '../../apps/gpu/gpu-readiness.js';
import { formatExplanation, formatLayerTable, summarizeStructure } from '../../analysis/report.js';
import { ModcError } from '../../core/errors.js';
import { loadModel } from '../../core/io/load.js';
import { readRoutingMetadata, type RoutingMetadata } from '../../metadata/routing-metadata.js';
import { summarizeModel } from '../../core/ir/model-summary.js';
import type { Command } from '../command.js';
import { formatSummary, onePositional, routedLayerJson, short } from '../shared.js';

function formatRouting(meta: RoutingMetadata): string {
  const per = meta.layers.map(
    (l) =>
      `${l.layer} (${l.part === 'block' ? '' : `${l.part}, `}${meta.mode === 'threshold' ? `p=${short(l.threshold)}` : `c=${short(l.capacity)}`}${l.surrogate ? `, surrogate rank ${l.surrogate.rank}` : ''})`,
  );
  const lines = [
    `routing    modc ${meta.mode}, ${meta.gated ? 'gated' : 'ungated'}; ${per.length ? `routers on layer${per.length === 1 ? '' : 's'} ${per.join(', ')}` : 'no router'}`,
  ];
  const replaced = meta.replaced ?? [];
  if (replaced.length)
    lines.push(
      `           MLP replaced by its surrogate (every token, no router) on layer${replaced.length === 1 ? '' : 's'} ${replaced.map((r) => `${r.layer} (rank ${r.surrogate.rank})`).join(', ')}`,
    );
  return lines.join('\n');
}

export const inspectCommand: Command = {
  name: 'inspect',
  summary: 'show a model: versions, I/O, op histogram, parameters, and its decoder layers',
  usage: 'modc inspect MODEL.onnx [--json] [--explain]',
  details: [
    "External weights are never read: sizes come from the model's own metadata. For a decoder it",
    'also prints the layer table found by dataflow analysis (residual in/out, attention form, KV',
    'names, node count) and the global facts; for a modc-compiled model, its routers. A model that',
    'is not a decoder modc can handle prints the basics and a one-line error (exit code 1).',
    'JSON: the model facts plus, for a decoder, { layers: [{ index, attention, kv: { key: {input,',
    'output}, value: {...}, layout, numKvHeads, headSize }, residualIn, residualOut, nodeCount,',
    'weights, sideInputs }], hiddenSize, numHeads, numKvHeads, headSize, dtype, positional, mask },',
    'and for a compiled model { routing: { mode, gated, layers: [{ layer, part, selected, threshold | capacity,',
    'surrogate? }], replaced? } } (threshold in threshold mode, capacity in topk mode; surrogate: { rank, macs, input,',
    'output } for an MLP part with a linear surrogate; replaced: [{ layer, part, surrogate }] for MLPs replaced by theirs).',
    '',
    'Both also report gpuReadiness, what one decode step asks of a GPU runtime, from the graph alone:',
    '  { decodeStep: { ifs: [{ name, depth, layer, part, condition: { value, expression, kind },',
    '      branches: { then: { nodes, ifs }, else: {...} } }], hostReads: [{ node, op, input, value, why,',
    '      depth, layer }], allSelected: { kernels, ifs, hostReads }, allSkipped: {...},',
    '      cudaGraphCapturable, cudaGraphBlockers },',
    '    kernelsPerConvertedLayer: [{ layer, parts, selected: { kernels, ifs, hostReads }, skipped: {...}, ifs, maxIfDepth }],',
    '    outsideLayers: { sharedRouting, model },',
    '    weightsBelowOneIfLevel: { uses, bytes, weights: [{ node, op, weight, bytes, levelsBelow }] } }',
    'Host reads are inputs whose values set a shape (or an If condition) computed on the device: one',
    'device-to-host copy per call on CUDA each. Kernels count nodes (Constants and Ifs apart) with',
    'modc ops inlined, before ONNX Runtime fuses anything. Weights two or more If levels below their',
    'initializer run unpacked on the CPU (should be none). The text output has a short section.',
  ].join('\n'),
  options: {
    json: { type: 'boolean', help: 'print one JSON object on stdout instead of text' },
    explain: { type: 'boolean', help: 'list why each candidate layer boundary was accepted or rejected' },
  },
  async run(positionals, values, io) {
    const path = onePositional(positionals, 'model path', 'inspect');
    const model = loadModel(path);
    const summary = summarizeModel(model);
    const routing = readRoutingMetadata(model);
    if (routing) {
      const gpu = gpuReadiness(model, routing.layers);
      const json = () =>
        JSON.stringify(
          { ...summary, routing: { ...routing, layers: routing.layers.map((l) => routedLayerJson(routing.mode, l)) }, gpuReadiness: gpu },
          null,
          2,
        );
      io.out(values.json ? json() : `${formatSummary(summary)}\n${formatRouting(routing)}\n\n${formatGpuReadiness(gpu)}`);
      return 0;
    }
    let structure;
    try {
      structure = analyzeDecoder(model);
    } catch (e) {
      if (!(e instanceof ModcError)) throw e;
      io.out(values.json ? JSON.stringify(summary, null, 2) : formatSummary(summary));
      throw new ModcError(`not a decoder modc can handle: ${e.message}`);
    }
    const gpu = gpuReadiness(model);
    if (values.json) {
      io.out(
        JSON.stringify(
          {
            ...summary,
            ...summarizeStructure(structure),
            ...(values.explain ? { explain: structure.explain.map((x) => ({ ...x })) } : {}),
            gpuReadiness: gpu,
          },
          null,
          2,
        ),
      );
    } else {
      const parts = [formatSummary(summary), '', 'decoder', formatLayerTable(structure), '', formatGpuReadiness(gpu)];
      if (values.explain) parts.push('', 'explanation', formatExplanation(structure));
      io.out(parts.join('\n'));
    }
    return 0;
  },
};
