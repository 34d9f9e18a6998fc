/**
 * onnxruntime-genai interop: the `genai_config.json` that sits beside a model, rewritten for its
 * compiled form. onnxruntime-genai drives a decoder from this file: one KV shape for every layer
 * (num_key_value_heads, head_size, one past length), the past/present names by pattern, and no
 * inputs besides ids, mask, positions and the caches. A compiled model fits that contract when
 * its caches keep the original interface (no routed layer, or MLP-only routing); then only the
 * file name changes. A routed attention or block layer has its own cache, with its own slot
 * validity (`past_valid.l` / `present_valid.l`) or cache length per row (`past_lengths.l` /
 * `present_lengths.l`, GroupQueryAttention and static caches; docs/interface.md), which
 * onnxruntime-genai cannot feed: the config then carries a top-level `modc` section with the
 * per-layer cache contract, which onnxruntime-genai refuses at load (its parser rejects unknown
 * keys) instead of failing mid-generation.
 */
import { copyFileSync, existsSync, readdirSync, readFileSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import { ModcError } from '../../core/errors.js';
import type { Model } from '../../core/ir/model.js';
import { logitsPositions } from '../../metadata/logits-metadata.js';
import { readRoutingMetadata } from '../../metadata/routing-metadata.js';
import { decoderIo } from '../../metadata/decoder-io.js';
import { writeTextAtomic } from '../../core/io/write-text.js';

export const GENAI_CONFIG = 'genai_config.json';
/** Files onnxruntime-genai reads from the model folder besides the config and the model. */
const COMPANIONS =
  /^(tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|added_tokens\.json|vocab\.json|merges\.txt|tokenizer\.model|generation_config\.json|chat_template\.jinja)$/;

export interface GenaiSource {
  path: string;
  config: Record<string, unknown>;
}

export interface GenaiResult {
  /** Where the updated config went; null when it was not written (see `reason`). */
  path: string | null;
  /** Whether the compiled model keeps the I/O contract onnxruntime-genai drives (same inputs, outputs, cache shapes). */
  loadable: boolean;
  /** Why not (or why nothing was written); null when loadable and written. */
  reason: string | null;
  /** Tokenizer and generation files copied beside the output. */
  copied: string[];
}

/** The genai_config.json beside `modelPath`, parsed; null when there is none. Read before any work. */
export function readGenaiConfig(modelPath: string): GenaiSource | null {
  const path = join(dirname(resolve(modelPath)), GENAI_CONFIG);
  if (!existsSync(path)) return null;
  let config: unknown;
  try {
    config = JSON.parse(readFileSync(path, 'utf8'));
  } catch (e) {
    throw new ModcError(`${path} is not valid JSON (${(e as Error).message.split('\n')[0]})`);
  }
  const decoder = (config as { model?: { decoder?: unknown } } | null)?.model?.decoder;
  if (typeof config !== 'object' || config === null || typeof decoder !== 'object' || decoder === null) {
    throw new ModcError(`${path} has no model.decoder object: not an onnxruntime-genai config`);
  }
  return { path, config: config as Record<string, unknown> };
}

/** The config for the compiled model: the file name, and the modc section where genai's contract no longer holds. */
export function genaiConfigFor(
  source: GenaiSource,
  compiled: Model,
  outputFile: string,
): { config: Record<string, unknown>; loadable: boolean; reason: string | null } {
  const config = structuredClone(source.config) as { model: { decoder: Record<string, unknown> } } & Record<string, unknown>;
  config.model.decoder.filename = outputFile;
  delete config.modc;
  const io = decoderIo(compiled);
  const ownLength = io.kv.filter((b) => b.pastLength !== null || b.pastValid !== null);
  const logits = logitsPositions(compiled);
  if (ownLength.length === 0) {
    const reason =
      logits === 'last'
        ? "logits are [batch, 1, vocab] (--logits last): onnxruntime-genai versions that read the prompt's logits at every position need --logits all"
        : null;
    return { config, loadable: true, reason };
  }
  const g = compiled.graph;
  const shape = (name: string) => g.inputs.find((v) => v.name === name)?.shape ?? null;
  const inputs = [...new Set(ownLength.map((b) => (b.pastValid ? 'past_valid.l / present_valid.l' : 'past_lengths.l / present_lengths.l')))].join(', ');
  const reason = `routed layer${ownLength.length === 1 ? '' : 's'} ${ownLength.map((b) => b.layer).join(', ')} cache${ownLength.length === 1 ? 's' : ''} a different number of tokens per row than the other layers (${inputs} inputs and outputs); onnxruntime-genai assumes one past length for every layer and cannot feed them`;
  const lengths = ownLength.some((b) => b.pastLength);
  const valid = ownLength.some((b) => b.pastValid);
  config.modc = {
    genai_loadable: false,
    reason,
    routing: readRoutingMetadata(compiled),
    logits,
    inputs: { ...(lengths ? { past_lengths_names: 'past_lengths.%d' } : {}), ...(valid ? { past_valid_names: 'past_valid.%d' } : {}) },
    outputs: { ...(lengths ? { present_lengths_names: 'present_lengths.%d' } : {}), ...(valid ? { present_valid_names: 'present_valid.%d' } : {}) },
    layers: io.kv.map((b) => ({
      layer: b.layer,
      past_key: b.pastKey,
      past_value: b.pastValue,
      present_key: b.presentKey,
      present_value: b.presentValue,
      past_length: b.pastLength,
      present_length: b.presentLength,
      past_valid: b.pastValid,
      present_valid: b.presentValid,
      shape: shape(b.pastKey),
    })),
  };
  return { config, loadable: false, reason };
}

/**
 * Writes the updated genai_config.json beside the compiled model (atomically), and copies the
 * tokenizer and generation files the folder needs. Never over the input's own config: when the
 * output shares the input's folder nothing is written, and the result says so.
 */
export function writeGenaiConfig(source: GenaiSource, compiled: Model, outputPath: string): GenaiResult {
  const outDir = dirname(resolve(outputPath));
  const target = join(outDir, GENAI_CONFIG);
  const { config, loadable, reason } = genaiConfigFor(source, compiled, basename(outputPath));
  if (resolve(target) === resolve(source.path)) {
    return {
      path: null,
      loadable,
      reason: `not written: the output is in the input's folder, whose ${GENAI_CONFIG} describes the original model${reason ? `; ${reason}` : ''}`,
      copied: [],
    };
  }
  writeTextAtomic(target, `${JSON.stringify(config, null, 4)}\n`);
  const copied: string[] = [];
  for (const f of readdirSync(dirname(source.path))) {
    if (!COMPANIONS.test(f) || existsSync(join(outDir, f))) continue;
    copyFileSync(join(dirname(source.path), f), join(outDir, f));
    copied.push(f);
  }
  return { path: target, loadable, reason, copied };
}

/** The compile summary's line about the config. */
export function describeGenai(r: GenaiResult): string {
  if (!r.path) return `${GENAI_CONFIG}: ${r.reason}`;
  const copied = r.copied.length ? ` (copied ${r.copied.join(', ')})` : '';
  if (r.loadable)
    return `wrote ${r.path}${copied}: the compiled model keeps onnxruntime-genai's contract (same inputs, outputs and cache shapes; new file name)${r.reason ? `, but ${r.reason}` : ''}`;
  return `wrote ${r.path}${copied}: onnxruntime-genai cannot drive the compiled model: ${r.reason}; drive it with ModSession, \`modc codegen\` or a client that feeds the lengths or slot validity (docs/serving.md)`;
}
