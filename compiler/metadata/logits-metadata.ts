/** Which positions a model's logits output holds, recorded by the last-logits pass in metadata_props. */
import type { Model } from '../core/ir/model.js';

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
