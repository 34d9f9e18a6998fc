/**
 * What the analysis finds in the real exports (read in place from ../shared/models), named as
 * the exporters named them; the builder look-alikes get the same checks in test/analysis.test.ts.
 */
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../../compiler/analysis/analyze.js';
import { causalKeyMask } from '../../compiler/analysis/attention.js';
import type { DecoderStructure, LayerInfo, SideInput } from '../../compiler/analysis/types.js';
import { loadModel } from '../../compiler/core/io/load.js';
import { decoderIo } from '../../compiler/metadata/decoder-io.js';
import { REAL_EXPORTS, sharedModel } from './shared-models.js';

const real = (name: string) => sharedModel(REAL_EXPORTS.find((e) => e.name === name)!);
const names = (vs: readonly ({ name: string } | null)[]) => vs.map((v) => v?.name ?? null);
const residualIns = (s: DecoderStructure) => names(s.layers.map((l) => l.residualIn));
const residualOuts = (s: DecoderStructure) => names(s.layers.map((l) => l.residualOut));
const kvNames = (l: LayerInfo) => [l.kv.key.input.name, l.kv.key.output.name, l.kv.value.input.name, l.kv.value.output.name];
const side = (l: LayerInfo, name: string): SideInput | undefined => l.sideInputs.find((s) => s.value.name === name);
const torchKv = (l: number) => [`past_key_values.${l}.key`, `present.${l}.key`, `past_key_values.${l}.value`, `present.${l}.value`];

describe("ONNX Runtime's transformers optimizer exports", () => {
  it('ort-gpt2-fused: EmbedLayerNorm start, SkipLayerNorm across boundaries, combined past, last add fused into the final norm', () => {
    const s = analyzeDecoder(loadModel(real('ort-gpt2-fused')));
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

  it('ort-qwen2-gqa: GroupQueryAttention with shared seqlens, SkipLayerNorm with the stream as input 0, fp16', () => {
    const s = analyzeDecoder(loadModel(real('ort-qwen2-gqa')));
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
});

describe('mobius exports: the first SkipLayerNormalization sums the token and position embeddings', () => {
  it.each(['mobius-attn24-dynamic-kv', 'mobius-gqa-fp16-packed'])(
    '%s: the stream starts at its output 3; the local function of the same name is noted, not followed',
    (name) => {
      const model = loadModel(real(name));
      expect(model.findFunction('com.microsoft', 'SkipLayerNormalization')).toBeDefined();
      const s = analyzeDecoder(model);
      const node = s.embedding.boundary!.node;
      expect(node.name).toBe('node_SkipLayerNormalization_0');
      expect(s.embedding.output.name).toBe('val_2');
      expect(s.layers[0]!.entryBoundary?.normed.name).toBe('v_transformer.h.0.ln_1.LayerNormalization_11');
      expect(s.embedding.positionTable?.name).toBe('transformer.wpe.weight');
      expect(s.explain.some((x) => x.subject === 'function com.microsoft::SkipLayerNormalization')).toBe(true);
    },
  );

  it('mobius-attn24-dynamic-kv runs one row per call (its mask puts the batch on the query axis); mobius-gqa-fp16-packed does not', () => {
    expect(decoderIo(loadModel(real('mobius-attn24-dynamic-kv'))).batchOne).toMatch(
      /^Unsqueeze node 'transformer\/Unsqueeze_node_4' moves attention_mask's batch axis/,
    );
    expect(decoderIo(loadModel(real('mobius-gqa-fp16-packed'))).batchOne).toBeNull();
  });

  it("mobius-attn24-dynamic-kv's mask is not read as attention_mask's keys (its batch lands on the query axis): a compacted layer rebuilds it", () => {
    const s = analyzeDecoder(loadModel(real('mobius-attn24-dynamic-kv')));
    expect(s.layers.map((l) => causalKeyMask(l.attention))).toEqual(s.layers.map(() => false));
  });
});
