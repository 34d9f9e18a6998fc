/** Temp folders for derived models (instrumented copies, calibration models) that reuse a model's weights. */
import { mkdtempSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Model } from '../ir/model.js';

/**
 * A new folder for models derived from `model`: the system temp folder, unless the model's
 * external weights lie on another disk, where a hard link cannot reach and a copy would
 * duplicate them; then a hidden folder beside the model, if that folder is writable. The
 * caller removes it.
 */
export function workFolder(model: Model, prefix: string): string {
  const external = [...model.graph.initializers.values()].some((v) => v.initializer?.external);
  const modelDir = model.baseDir;
  if (external && modelDir && statSync(tmpdir()).dev !== statSync(modelDir).dev) {
    try {
      return mkdtempSync(join(modelDir, `.${prefix}-`));
    } catch {
      // A read-only model folder: the weights get copied to the temp folder instead.
    }
  }
  return mkdtempSync(join(tmpdir(), `${prefix}-`));
}
