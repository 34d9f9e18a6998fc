/** `modc verify`: a compiled model against its original (MoD semantics and the equivalence anchor). */
import { UsageError } from '../../core/errors.js';
import { verifyCompiled } from '../../apps/verify/verify.js';
import type { Command } from '../command.js';
import { executionProvider, intFlag, modelPair, numberFlag, padSide, parseIdRows, progressOf, stringFlag } from '../shared.js';

export const verifyCommand: Command = {
  name: 'verify',
  summary: 'check a compiled model against its original: MoD semantics and the equivalence anchor',
  usage: 'modc verify ORIGINAL.onnx COMPILED.onnx [--ids "1,2,3;4,5"] [--steps N] [--pad left|right] [--tolerance X] [--ep cpu|cuda] [--json]',
  details: [
    'semantics: the compiled model, on a prompt and N teacher-forced steps, agrees with the MoD',
    "reference executor running the original with the compiled model's own routers (logits at real",
    'positions within the tolerance, the same per-layer cache lengths, and the same KV bytes once the',
    "compiled model's session compacts its caches).",
    'anchor: the original compiled on the same layers with every token selected, ungated,',
    'reproduces the original. Exit code 1 when a check fails.',
    '--json prints { passed, tolerance, checks: [{ name, passed, maxDiff: [prefill, step 1, ...],',
    'cacheLengthsMatch, kvBytesMatch }] }.',
  ].join('\n'),
  options: {
    ids: { type: 'string', valueName: 'IDS', help: 'prompt rows (default "5,6,7,8,9,10,11;12,13,14;15,16,17,18,19")' },
    steps: { type: 'string', valueName: 'N', help: 'decode steps after the prompt (default 8)' },
    pad: {
      type: 'string',
      valueName: 'SIDE',
      help: 'pad shorter rows on the left or right (default left; right, the only side it takes, for GroupQueryAttention)',
    },
    ep: { type: 'string', valueName: 'EP', help: 'execution provider of the compiled model and the anchor pair: cpu (default) or cuda' },
    tolerance: { type: 'string', valueName: 'X', help: 'largest allowed logit difference (default 1e-4; 1e-2 for float16 models)' },
    json: { type: 'boolean', help: 'print the report as JSON' },
  },
  async run(positionals, values, io) {
    const [original, compiled] = modelPair(positionals);
    const steps = intFlag(values, 'steps', 8, 0);
    const tolerance = numberFlag(values, 'tolerance');
    if (tolerance !== undefined && !(tolerance >= 0)) throw new UsageError('--tolerance must be a non-negative number');
    const prompt = parseIdRows(stringFlag(values, 'ids') ?? '5,6,7,8,9,10,11;12,13,14;15,16,17,18,19');
    const progress = progressOf(io);
    const report = await verifyCompiled(
      original,
      compiled,
      { prompt, steps, pad: padSide(values), tolerance, executionProvider: executionProvider(values), defaultPrompt: stringFlag(values, 'ids') === undefined },
      (m) => progress.stage(m),
    );
    progress.stop();
    if (values.json) {
      io.out(JSON.stringify(report, null, 2));
    } else {
      for (const c of report.checks) {
        io.out(
          `${c.passed ? 'PASS' : 'FAIL'} ${c.name}: max |logit diff| ${Math.max(...c.maxDiff).toExponential(2)} (tolerance ${report.tolerance}), cache lengths ${c.cacheLengthsMatch ? 'match' : 'differ'}, kv bytes ${c.kvBytesMatch ? 'match' : 'differ'}`,
        );
      }
    }
    return report.passed ? 0 : 1;
  },
};
