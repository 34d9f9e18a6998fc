/**
 * The decoder analysis finds, from dataflow alone, what a reader finds by reading each graph
 * (printGraph): the residual stream, the layers, their KV caches and side inputs. Every expected
 * name below was read off the printed graph by hand.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { formatExplanation, formatLayerTable, summarizeStructure } from '../compiler/analysis/report.js';
import type { DecoderStructure, LayerInfo, SideInput } from '../compiler/analysis/types.js';
import { ModcError } from '../compiler/core/errors.js';
import { loadModel } from '../compiler/core/io/load.js';
import { ROOT } from './helpers.js';

const fixture = (name: string) => join(ROOT, 'fixtures', name, 'model.onnx');

const names = (vs: readonly ({ name: string } | null)[]) => vs.map((v) => v?.name ?? null);
const residualIns = (s: DecoderStructure) => names(s.layers.map((l) => l.residualIn));
const residualOuts = (s: DecoderStructure) => names(s.layers.map((l) => l.residualOut));
const kvNames = (l: LayerInfo) => [l.kv.key.input.name, l.kv.key.output.name, l.kv.value.input.name, l.kv.value.output.name];
/** Non-weight side inputs as `kind:name`. */
const sideKinds = (l: LayerInfo) =>
  l.sideInputs
    .filter((s) => s.kind !== 'weight')
    .map((s) => `${s.kind}:${s.value.name}`)
    .sort();
const side = (l: LayerInfo, name: string): SideInput | undefined => l.sideInputs.find((s) => s.value.name === name);
const torchKv = (l: number) => [`past_key_values.${l}.key`, `present.${l}.key`, `past_key_values.${l}.value`, `present.${l}.value`];

describe('torch-exported, unfused', () => {
  it('gpt2-tiny: learned positions, pre-LayerNorm, two adds per layer', () => {
    const s = analyzeDecoder(loadModel(fixture('gpt2-tiny')));
    expect(s.layers).toHaveLength(3);
    expect(residualIns(s)).toEqual(['/Add_1_output_0', '/layers.0/Add_4_output_0', '/layers.1/Add_4_output_0']);
    expect(residualOuts(s)).toEqual(['/layers.0/Add_4_output_0', '/layers.1/Add_4_output_0', '/layers.2/Add_4_output_0']);
    expect(s.layers.map((l) => l.steps.map((st) => st.node.name))).toEqual([0, 1, 2].map((l) => [`/layers.${l}/Add_1`, `/layers.${l}/Add_4`]));
    s.layers.forEach((l, i) => {
      expect(kvNames(l)).toEqual(torchKv(i));
      expect(l.kv).toMatchObject({ layout: 'BHTD', numKvHeads: 4, headSize: 16 });
      expect(l.attention.form).toBe('unfused');
      if (l.attention.form === 'unfused') expect(l.attention.softmax.name).toBe(`/layers.${i}/Softmax`);
      expect(sideKinds(l)).toEqual(['attention-mask:/Where_output_0', `past-kv:past_key_values.${i}.key`, `past-kv:past_key_values.${i}.value`]);
      expect(side(l, '/Where_output_0')).toMatchObject({ form: 'additive-bias', queryAxis: 2, keyAxis: 3 });
      expect(l.entryBoundary).toBeNull();
    });
    expect(s.embedding.table.name).toBe('wte.weight');
    expect(s.embedding.positionTable?.name).toBe('wpe.weight');
    expect(s).toMatchObject({ hiddenSize: 64, numHeads: 4, numKvHeads: 4, headSize: 16, dtype: 'float32', positional: 'absolute' });
    expect(s.mask.form).toBe('additive-bias');
    expect(names(s.mask.outputs)).toEqual(['/Where_output_0']);
    expect(names(s.mask.inputs)).toContain('attention_mask');
    expect(s.final.norm?.name).toBe('/norm_f/LayerNormalization');
    expect(s.final.logits.name).toBe('logits');
  });

  it('llama-tiny: decomposed RMSNorm, in-graph rotary from position_ids, GQA through Expand', () => {
    const s = analyzeDecoder(loadModel(fixture('llama-tiny')));
    expect(s.layers).toHaveLength(3);
    expect(residualIns(s)).toEqual(['/embed_tokens/Gather_output_0', '/layers.0/Add_4_output_0', '/layers.1/Add_4_output_0']);
    expect(residualOuts(s)).toEqual(['/layers.0/Add_4_output_0', '/layers.1/Add_4_output_0', '/layers.2/Add_4_output_0']);
    s.layers.forEach((l, i) => {
      expect(kvNames(l)).toEqual(torchKv(i));
      expect(l.kv).toMatchObject({ numKvHeads: 2, headSize: 16 });
      expect(l.attention.numHeads).toBe(4);
      expect(l.steps[0]!.norm?.kind).toBe('decomposed');
      expect(sideKinds(l)).toEqual([
        'attention-mask:/Where_output_0',
        `past-kv:past_key_values.${i}.key`,
        `past-kv:past_key_values.${i}.value`,
        'per-token:/rotary/Unsqueeze_1_output_0',
        'per-token:/rotary/Unsqueeze_2_output_0',
      ]);
      // position_ids [B,S] -> Unsqueeze(2) -> * inv_freq [1,1,8] -> Concat -> Cos -> Unsqueeze(1): [B,1,S,16]
      expect(side(l, '/rotary/Unsqueeze_1_output_0')).toMatchObject({ kind: 'per-token', role: 'rotary-cos', batchAxis: 0, sequenceAxis: 2 });
      expect(side(l, '/rotary/Unsqueeze_2_output_0')).toMatchObject({ kind: 'per-token', role: 'rotary-sin', batchAxis: 0, sequenceAxis: 2 });
    });
    expect(s).toMatchObject({ hiddenSize: 64, numHeads: 4, numKvHeads: 2, headSize: 16, dtype: 'float32', positional: 'rotary-graph' });
    expect(s.embedding.positionTable).toBeNull();
  });

  it('neox-tiny: parallel residual, the MLP reads the norm of the layer input, not of the attention sum', () => {
    const s = analyzeDecoder(loadModel(fixture('neox-tiny')));
    expect(s.layers).toHaveLength(3);
    expect(residualIns(s)).toEqual(['/embed_in/Gather_output_0', '/layers.0/Add_5_output_0', '/layers.1/Add_5_output_0']);
    expect(residualOuts(s)).toEqual(['/layers.0/Add_5_output_0', '/layers.1/Add_5_output_0', '/layers.2/Add_5_output_0']);
    for (const l of s.layers) {
      const [attn, mlp] = l.steps;
      expect(l.steps).toHaveLength(2);
      expect(attn!.attention).not.toBeNull();
      expect(mlp!.attention).toBeNull();
      expect(mlp!.norm?.kind).toBe('op');
      expect(mlp!.norm?.of).toBe(l.residualIn);
      expect(mlp!.norm?.node.name).toBe(`/layers.${l.index}/post_attention_layernorm/LayerNormalization`);
      expect(l.mlpNodes.map((n) => n.name)).toContain(`/layers.${l.index}/dense_h_to_4h/MatMul`);
      expect(l.mlpNodes.map((n) => n.name)).not.toContain(`/layers.${l.index}/dense/MatMul`);
    }
    expect(s).toMatchObject({ numHeads: 4, numKvHeads: 4, headSize: 16, positional: 'rotary-graph' });
  });
});

describe("ONNX Runtime's fused forms (builder look-alikes; test/interop checks the same on the exports themselves)", () => {
  it('forms-fused-gpt2-tiny: EmbedLayerNorm start, SkipLayerNorm across boundaries, combined past, last add fused into the final norm', () => {
    const s = analyzeDecoder(loadModel(fixture('forms-fused-gpt2-tiny')));
    expect(s.layers).toHaveLength(5);
    expect(residualIns(s)).toEqual(['EmbedLayerNormalization_0_embedding_sum', ...[0, 1, 2, 3].map((l) => `/transformer/h.${l}/Add_1_output_0`)]);
    expect(residualOuts(s)).toEqual([...[0, 1, 2, 3].map((l) => `/transformer/h.${l}/Add_1_output_0`), null]);
    const last = s.layers[4]!;
    expect(last.exit.node.name).toBe('SkipLayerNorm_AddBias_9');
    // SkipLayerNorm(input = MLP output, skip = stream): the stream is operand 1 here.
    expect(last.exit).toMatchObject({ streamOperandIndex: 1, branchOperandIndex: 0 });
    expect(s.final.residual).toBeNull();
    expect(s.final.norm?.name).toBe('SkipLayerNorm_AddBias_9');
    s.layers.forEach((l, i) => {
      expect(l.attention.form).toBe('Attention');
      expect(l.kv.layout).toBe('combined-2BHTD');
      expect(l.kv.key.input.name).toBe(`past_${i}`);
      expect(l.kv.value.output.name).toBe(`present_${i}`);
      expect(side(l, 'attention_mask')).toMatchObject({ kind: 'attention-mask', form: 'raw-2d', keyAxis: 1 });
      expect(side(l, `past_${i}`)).toMatchObject({ kind: 'past-kv', role: 'key-and-value' });
      expect(l.exitBoundary?.node.name).toBe(`SkipLayerNorm_AddBias_${2 * i + 1}`);
      expect(l.exitBoundary?.normedForLayer).toBe(i + 1);
    });
    expect(s.layers[0]!.entryBoundary).toMatchObject({ op: 'EmbedLayerNormalization', addsForLayer: -1, normedForLayer: 0 });
    expect(s.layers[0]!.entryBoundary?.normed.name).toBe('EmbedLayerNormalization_0_output');
    expect(s.layers[1]!.entryBoundary?.normed.name).toBe('/transformer/h.1/ln_1/Add_1_output_0');
    expect(s).toMatchObject({ hiddenSize: 32, numHeads: 4, numKvHeads: 4, headSize: 8, dtype: 'float32', positional: 'absolute' });
    expect(s.mask.form).toBe('raw-2d');
    expect(names(s.mask.outputs)).toEqual(['attention_mask']);
  });

  it('forms-gqa-fp16-tiny: GroupQueryAttention with shared seqlens, SkipLayerNorm with the stream as input 0, fp16', () => {
    const s = analyzeDecoder(loadModel(fixture('forms-gqa-fp16-tiny')));
    expect(s.layers).toHaveLength(2);
    expect(residualIns(s)).toEqual(['inputs_embeds', 'l0.r2']);
    expect(residualOuts(s)).toEqual(['l0.r2', null]);
    expect(s.layers[1]!.exit.node.name).toBe('SkipLayerNorm_3');
    expect(s.layers[1]!.exit).toMatchObject({ streamOperandIndex: 0, branchOperandIndex: 1 });
    expect(s.layers[0]!.steps.map((st) => st.node.name)).toEqual(['SkipLayerNorm_0', 'SkipLayerNorm_1']);
    s.layers.forEach((l, i) => {
      expect(l.attention.form).toBe('GroupQueryAttention');
      expect(kvNames(l)).toEqual(torchKv(i));
      expect(l.attention.numHeads).toBe(4);
      expect(l.kv).toMatchObject({ layout: 'BHTD', numKvHeads: 2, headSize: 16 });
      expect(side(l, 'seqlens_k')).toMatchObject({ kind: 'sequence-length', role: 'seqlens_k' });
      expect(side(l, 'total_sl')).toMatchObject({ kind: 'sequence-length', role: 'total_sequence_length' });
    });
    expect(s).toMatchObject({ hiddenSize: 64, numHeads: 4, numKvHeads: 2, headSize: 16, dtype: 'float16', positional: 'none' });
    expect(s.mask.form).toBe('seqlens');
    expect(names(s.mask.outputs).sort()).toEqual(['seqlens_k', 'total_sl']);
    expect(names(s.mask.inputs)).toEqual(['attention_mask']);
    expect(s.mask.nodes.map((n) => n.outputs[0]!.name)).toEqual(['attn_mask_i32', 'seqlens_k_p1', 'seqlens_k', 'mask_shape', 'total_sl_i64', 'total_sl']);
  });

  it('genai-tiny: RotaryEmbedding + MultiHeadAttention + SkipSimplifiedLayerNorm, external fp16 weights', () => {
    const s = analyzeDecoder(loadModel(fixture('genai-tiny')));
    const sln = (l: number, which: string) => `/model/layers.${l}/${which}/SkipLayerNorm/output_3`;
    expect(s.layers).toHaveLength(3);
    expect(residualIns(s)).toEqual(['/model/embed_tokens/Gather/output_0', sln(1, 'input_layernorm'), sln(2, 'input_layernorm')]);
    expect(residualOuts(s)).toEqual([sln(1, 'input_layernorm'), sln(2, 'input_layernorm'), null]);
    s.layers.forEach((l, i) => {
      expect(l.attention.form).toBe('MultiHeadAttention');
      expect(kvNames(l)).toEqual(torchKv(i));
      expect(side(l, 'position_ids')).toMatchObject({ kind: 'per-token', role: 'positions', batchAxis: 0, sequenceAxis: 1 });
      expect(side(l, '/model/attn_mask/Where/output_0')).toMatchObject({ kind: 'attention-mask', form: 'additive-bias', queryAxis: 2, keyAxis: 3 });
      expect(side(l, 'cos_cache')?.kind).toBe('weight');
    });
    expect(s.layers[2]!.exit.node.name).toBe('/model/layers.3/final_norm_layernorm/SkipLayerNorm');
    expect(s).toMatchObject({ hiddenSize: 64, numHeads: 4, numKvHeads: 4, headSize: 16, dtype: 'float16', positional: 'rotary-op' });
  });
});

describe('analysis reads dataflow, not names', () => {
  it('finds the same layers after every node name is erased', () => {
    const model = loadModel(fixture('llama-tiny'));
    for (const n of model.graph.nodes) n.name = '';
    const s = analyzeDecoder(model);
    expect(residualOuts(s)).toEqual(['/layers.0/Add_4_output_0', '/layers.1/Add_4_output_0', '/layers.2/Add_4_output_0']);
  });
});

describe('reports', () => {
  it('summarises the structure as JSON that survives a round trip, and explains each boundary', () => {
    const s = analyzeDecoder(loadModel(fixture('forms-fused-gpt2-tiny')));
    const json = summarizeStructure(s);
    expect(JSON.parse(JSON.stringify(json))).toEqual(json);
    expect(json.layers[4]).toMatchObject({
      index: 4,
      attention: 'Attention',
      residualIn: '/transformer/h.3/Add_1_output_0',
      residualOut: null,
      kv: { key: { input: 'past_4', output: 'present_4' } },
    });
    expect(json.layers[0]!.sideInputs).toContainEqual({ name: 'attention_mask', kind: 'attention-mask', form: 'raw-2d', queryAxis: null, keyAxis: 1 });
    expect(formatLayerTable(s)).toContain('layer 4: Attention');
    const explanation = formatExplanation(s);
    expect(explanation).toContain("[accepted] com.microsoft::SkipLayerNormalization node 'SkipLayerNorm_AddBias_0' (layer 0): residual step");
    expect(explanation).toContain('fused layer boundary');
  });
});

describe('models that are not decoders fail with one line saying what was missing', () => {
  it('a MatMul + Relu model has no token embedding', async () => {
    const { Graph, Value } = await import('../compiler/core/ir/graph.js');
    const { Model } = await import('../compiler/core/ir/model.js');
    const { Tensor } = await import('../compiler/core/ir/tensor.js');
    const g = new Graph('mlp');
    const x = g.addInput(new Value('x', { tensor_type: { elem_type: 1, shape: { dim: [{ dim_value: 2 }, { dim_value: 4 }] } } }));
    const w = g.addInitializer(new Value('w'), Tensor.fromArray('w', [4, 4], new Float32Array(16)));
    const y = g.addNode('Relu', [g.addNode('MatMul', [x, w]).output(0)]).output(0);
    g.outputs = [y];
    y.type = { tensor_type: { elem_type: 1 } };
    const m = new Model(g);
    m.opsetImports = [{ domain: '', version: 17 }];
    expect(() => analyzeDecoder(m)).toThrow(ModcError);
    expect(() => analyzeDecoder(m)).toThrow(
      /^no residual stream: expected a token embedding Gather by input_ids, but the model has no input_ids input \(inputs: x\)$/,
    );
  });

  it('an embedding followed by an MLP has no residual step', async () => {
    const { Graph, Value } = await import('../compiler/core/ir/graph.js');
    const { Model } = await import('../compiler/core/ir/model.js');
    const { Tensor } = await import('../compiler/core/ir/tensor.js');
    const g = new Graph('bag');
    const ids = g.addInput(new Value('input_ids', { tensor_type: { elem_type: 7, shape: { dim: [{ dim_param: 'b' }, { dim_param: 's' }] } } }));
    const table = g.addInitializer(new Value('table'), Tensor.fromArray('table', [10, 4], new Float32Array(40)));
    const w = g.addInitializer(new Value('w'), Tensor.fromArray('w', [4, 10], new Float32Array(40)));
    const emb = g.addNode('Gather', [table, ids], 1, { name: 'embed' }).output(0);
    const logits = g.addNode('MatMul', [g.addNode('Relu', [emb]).output(0), w]).output(0);
    g.outputs = [logits];
    const m = new Model(g);
    m.opsetImports = [{ domain: '', version: 17 }];
    let message = '';
    try {
      analyzeDecoder(m);
    } catch (e) {
      message = (e as Error).message;
    }
    expect(message).toMatch(
      /^no residual stream: expected an Add fed by the embedding output %embed_out and a branch computed from it \(usually through a norm\); %embed_out is read by Relu node/,
    );
    expect(message).not.toContain('\n');
  });
});
