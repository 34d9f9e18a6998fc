/** Fuzz worker process: runs the cases its parent sends, one at a time, and answers each. */
import { runCase, type CaseSpec } from './run-case.js';

process.on('message', (spec: CaseSpec) => {
  void runCase(spec).then((outcome) => process.send!(outcome));
});
process.on('disconnect', () => process.exit(0));
