/**
 * Which positions a model's logits output holds, recorded by the last-logits pass in metadata_props;
 * and whether the output is logits at all.
 */
import { analyzeDecoder } from '../analysis/analyze.js';
import { ModcError } from '../core/errors.js';
import type { Model } from '../core/ir/model.js';
import { readRoutingMetadata } from './routing-metadata.js';

export const LOGITS_METADATA_KEY = 'modc.logits';

/** 'all': every position of the call, [B, S, V]. 'last': each row's last real position, [B, 1, V]. */
export type LogitsPositions = 'all' | 'last';

export function logitsPositions(model: Model): LogitsPositions {
  return model.metadataProps.find((p) => p.key === LOGITS_METADATA_KEY)?.value === 'last' ? 'last' : 'all';
}

export function writeLogitsPositions(model: Model, positions: LogitsPositions): void {
  const rest = model.metadataProps.filter((p) => p.key !== LOGITS_METADATA_KEY);
  model.metadataProps = positions === 'last' ? [...rest, { key: LOGITS_METADATA_KEY, value: 'last' }] : rest;
}

/** Metadata a compile writes for a model whose output is hidden states, not logits (value 'hidden'). */
export const OUTPUT_METADATA_KEY = 'modc.output';

export function writeOutputKind(model: Model, kind: 'logits' | 'hidden'): void {
  const rest = model.metadataProps.filter((p) => p.key !== OUTPUT_METADATA_KEY);
  model.metadataProps = kind === 'hidden' ? [...rest, { key: OUTPUT_METADATA_KEY, value: 'hidden' }] : rest;
}

/**
 * Whether the model outputs logits or hidden states (no vocabulary projection after the final
 * norm): recorded by a compile, else read off the original by the decoder analysis. A model modc
 * compiled without recording it, or one the analysis cannot read, counts as logits.
 */
export function outputKind(model: Model): 'logits' | 'hidden' {
  const recorded = model.metadataProps.find((p) => p.key === OUTPUT_METADATA_KEY)?.value;
  if (recorded === 'hidden') return 'hidden';
  try {
    if (readRoutingMetadata(model)) return 'logits';
    return analyzeDecoder(model).final.kind;
  } catch {
    return 'logits';
  }
}

/** Refuses a model whose output is hidden states, for a `what` that needs logits. */
export function requireLogits(model: Model, what: string): void {
  if (outputKind(model) !== 'hidden') return;
  const out = model.graph.outputs.find((v) => v.name === 'logits') ?? model.graph.outputs[0];
  const dims = out?.shape ? ` [${out.shape.map((d) => d ?? '?').join(', ')}]` : '';
  throw new ModcError(
    `${what} needs logits, and this model outputs hidden states (${out?.name ?? 'its first output'}${dims}: no vocabulary projection follows its final norm)`,
  );
}
