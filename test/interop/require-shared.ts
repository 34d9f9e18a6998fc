/**
 * vitest globalSetup of the interop project: without ../shared/models the suite fails at once, in
 * one line naming what is missing and where to get it.
 */
import { sharedModelsProblem } from './shared-models.js';

export default function setup(): void {
  const problem = sharedModelsProblem();
  if (problem) {
    process.stderr.write(`modc interop: ${problem}\n`);
    process.exit(1);
  }
}
