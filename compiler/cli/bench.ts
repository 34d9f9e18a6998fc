/** `modc bench`: speed and memory of an original and its compiled model, side by side in one run. */
import { benchPair } from '../benchmark.js';
import { loadModel } from '../io/load.js';
import { decoderIo } from '../runtime/decoder-io.js';
import { intFlag, modelPair } from './args.js';
import type { Command } from './command.js';
import { formatBytes, table } from './format.js';
import { progressOf } from './progress.js';
import { executionProvider } from './run.js';

export const benchCommand: Command = {
  name: 'bench',
  summary: 'time prefill and decode, and measure KV bytes, of an original and its compiled model',
  usage: 'modc bench ORIGINAL.onnx COMPILED.onnx [--prompt N] [--batch B] [--steps N] [--runs N] [--warmup N] [--ep cpu|cuda] [--json]',
  details: [
    'Both models get the same pseudo-random prompt. Times are medians over --runs (after --warmup',
    'runs): the prefill, and every decode step of every run. KV bytes and per-layer cache lengths are',
    'taken after the last run. --json prints [{ model, prefillMs, decodeMsPerToken, kvBytes, cacheLengths }].',
  ].join('\n'),
  options: {
    prompt: { type: 'string', valueName: 'N', help: 'prompt length in tokens (default 128)' },
    batch: { type: 'string', valueName: 'B', help: 'rows (default 1)' },
    steps: { type: 'string', valueName: 'N', help: 'decode steps per run (default 16)' },
    runs: { type: 'string', valueName: 'N', help: 'timed runs (default 3)' },
    warmup: { type: 'string', valueName: 'N', help: 'untimed runs first (default 1)' },
    ep: { type: 'string', valueName: 'EP', help: 'execution provider: cpu (default) or cuda' },
    json: { type: 'boolean', help: 'print the rows as JSON' },
  },
  async run(positionals, values, io) {
    const [original, compiled] = modelPair(positionals);
    const opts = {
      promptLength: intFlag(values, 'prompt', 128, 1),
      batch: intFlag(values, 'batch', 1, 1),
      steps: intFlag(values, 'steps', 16, 0),
      runs: intFlag(values, 'runs', 3, 1),
      warmup: intFlag(values, 'warmup', 1, 0),
      executionProvider: executionProvider(values),
    };
    const vocab = decoderIo(loadModel(original)).vocabSize ?? 100;
    if (!values.json) io.err(`prompt ${opts.promptLength} x batch ${opts.batch}, ${opts.steps} decode steps, median of ${opts.runs} runs after ${opts.warmup} warm-up, ${opts.executionProvider} EP`);
    const progress = progressOf(io);
    progress.stage(`bench: ${opts.warmup + opts.runs} runs of each model`);
    const [a, b] = await benchPair(original, compiled, vocab, opts);
    progress.stop();
    if (values.json) {
      io.out(JSON.stringify([a, b], null, 2));
      return 0;
    }
    const rows = [['', 'prefill', 'decode / token', 'KV bytes'],
      ['original', `${a!.prefillMs.toFixed(1)} ms`, `${a!.decodeMsPerToken.toFixed(2)} ms`, formatBytes(a!.kvBytes)],
      ['compiled', `${b!.prefillMs.toFixed(1)} ms`, `${b!.decodeMsPerToken.toFixed(2)} ms`, formatBytes(b!.kvBytes)],
      ['original / compiled', `${(a!.prefillMs / b!.prefillMs).toFixed(2)}x`, `${(a!.decodeMsPerToken / b!.decodeMsPerToken).toFixed(2)}x`, `${(a!.kvBytes / b!.kvBytes).toFixed(2)}x`]];
    io.out(table(rows, '').join('\n'));
    return 0;
  },
};
