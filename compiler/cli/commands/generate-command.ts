/** `modc generate`: a prefill and N decode steps on any model, original or compiled. */
import { UsageError } from '../../core/errors.js';
import { loadModel } from '../../core/io/load.js';
import { decoderIo } from '../../metadata/decoder-io.js';
import { requireLogits } from '../../metadata/logits-metadata.js';
import { embeddingChoice } from '../../runtime/embeddings.js';
import { ModSession } from '../../runtime/session.js';
import type { Command } from '../command.js';
import { executionProvider, numberFlag, onePositional, padSide, parseIdList, parseIdRows, progressOf, PROMPT_OPTIONS, stringFlag } from '../shared.js';

export const generateCommand: Command = {
  name: 'generate',
  summary: 'run a prefill and N decode steps (greedy, or teacher-forced with --force)',
  usage: 'modc generate MODEL.onnx --ids "1,2,3[;4,5]" --max-new N [--force "7,8,9"] [--logits] [--pad left|right] [--ep cpu|cuda] [--json]',
  details: [
    'Greedy by default. --force feeds the given ids instead of the argmax, one per step, the same',
    'for every row, so two models can be compared step by step. With --json it prints',
    '  {"ids": [[...]], "steps": [{"logits": [[...]]}], "kvBytes": n, "cacheLengths": [[...]]}',
    'ids: per row, the prompt then the new tokens. steps: N+1 entries (after the prefill, then',
    "after each fed token), each with the last position's logits per row when --logits is given.",
    'kvBytes: bytes the KV cache tensors hold at the end. cacheLengths: [layer][row], the real',
    "tokens each layer's cache holds at the end.",
  ].join('\n'),
  options: {
    ...PROMPT_OPTIONS,
    'max-new': { type: 'string', valueName: 'N', help: 'decode steps to run (required)' },
    force: { type: 'string', valueName: 'IDS', help: 'feed these ids (one per step) instead of the argmax' },
    logits: { type: 'boolean', help: "include each step's last-position logits in the JSON" },
  },
  async run(positionals, values, io) {
    const path = onePositional(positionals, 'model path', 'generate');
    const text = stringFlag(values, 'ids');
    const model = loadModel(path);
    requireLogits(model, 'generate');
    const embeds = embeddingChoice(path, decoderIo(model), stringFlag(values, 'embeds'));
    if (text === undefined && !embeds?.prompt) throw new UsageError('missing --ids');
    const maxNew = numberFlag(values, 'max-new');
    if (maxNew === undefined || !Number.isInteger(maxNew) || maxNew < 0) throw new UsageError('--max-new must be a non-negative integer');
    const forceText = stringFlag(values, 'force');
    const force = forceText !== undefined ? parseIdList(forceText, '--force') : undefined;
    const rows = text === undefined ? [] : parseIdRows(text);
    const progress = progressOf(io);
    progress.stage('load');
    const session = await ModSession.create(path, { executionProvider: executionProvider(values), embeddings: embeds?.source });
    progress.stage('generate', maxNew + 1);
    const result = await session.generate(rows, {
      maxNewTokens: maxNew,
      force,
      pad: padSide(values),
      embeds: embeds?.prompt ?? undefined,
      onStep: () => progress.tick(),
    });
    progress.stop();
    if (values.json) {
      io.out(
        JSON.stringify({
          ids: result.ids,
          steps: result.steps.map((rowsLogits) => (values.logits ? { logits: rowsLogits.map((l) => Array.from(l)) } : {})),
          kvBytes: session.kvBytes(),
          cacheLengths: session.layerCacheLengths(),
        }),
      );
    } else {
      result.ids.forEach((ids, b) => io.out(`row ${b}: ${ids.join(' ')}`));
      io.out(`kv cache: ${session.kvBytes()} bytes; per-layer lengths ${JSON.stringify(session.layerCacheLengths())}`);
    }
    return 0;
  },
};
