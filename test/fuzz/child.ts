/** Fuzz worker process: runs the cases its parent sends, one at a time, and answers each. */
import { runCase, type CaseSpec } from './run-case.js';

process.on('message', (spec: CaseSpec) => {
  void runCase(spec, (stage) => process.send!({ stage })).then(
    (outcome) => process.send!(outcome),
    // The fuzzer's own failure (building the mutant): reported, not a silent death.
    (e: Error) => process.send!({ kind: 'crash', stage: 'fuzzer', message: `${e?.name}: ${e?.message}\n${e?.stack ?? ''}`, log: [] }),
  );
});
process.on('disconnect', () => process.exit(0));
