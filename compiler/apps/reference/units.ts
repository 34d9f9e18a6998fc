/** Loading and running the reference executor's units (standalone ONNX models chained by value name). */
import type { LoadedUnit } from '../../runtime/layer-runner.js';

export { loadUnit, runUnit } from '../../runtime/layer-runner.js';

export async function releaseUnits(units: readonly LoadedUnit[]): Promise<void> {
  for (const u of units) await u.session.release();
}
