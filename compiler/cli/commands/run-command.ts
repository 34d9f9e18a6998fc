/** `modc run`: one forward over a prompt (past length 0) on any model, original or compiled. */
import { UsageError } from '../../core/errors.js';
import { loadModel } from '../../core/io/load.js';
import { decoderIo } from '../../metadata/decoder-io.js';
import { requireLogits } from '../../metadata/logits-metadata.js';
import { embeddingChoice } from '../../runtime/embeddings.js';
import { argmax, ModSession, padRows } from '../../runtime/session.js';
import type { Command } from '../command.js';
import { executionProvider, onePositional, padSide, parseIdRows, progressOf, PROMPT_OPTIONS, stringFlag } from '../shared.js';

export const runCommand: Command = {
  name: 'run',
  summary: 'run one forward pass over a prompt and print the logits',
  usage: 'modc run MODEL.onnx --ids "5,6,7;8,9" [--pad left|right] [--ep cpu|cuda] [--json]',
  details: [
    'Rows are separated by `;`. Shorter rows are padded with id 0 and masked out. Positions count',
    'real tokens only. With --json it prints',
    '  {"logits": [[[...]]], "dims": [B, S, V], "attentionMask": [[...]], "inputIds": [[...]]}',
    'where logits is [batch][position][vocab] over the padded prompt (padding positions included;',
    'attentionMask says which they are). float16 logits are converted to numbers. A model compiled',
    'with --logits last gives one position per row, its last real token: dims [B, 1, V] and',
    '"positions": "last" (otherwise "all").',
  ].join('\n'),
  options: PROMPT_OPTIONS,
  async run(positionals, values, io) {
    const path = onePositional(positionals, 'model path', 'run');
    const text = stringFlag(values, 'ids');
    const model = loadModel(path);
    requireLogits(model, 'run');
    const embeds = embeddingChoice(path, decoderIo(model), stringFlag(values, 'embeds'));
    if (text === undefined && !embeds?.prompt) throw new UsageError('missing --ids');
    const rows = text === undefined ? [] : parseIdRows(text);
    const pad = padSide(values);
    const progress = progressOf(io);
    progress.stage('load');
    const session = await ModSession.create(path, { executionProvider: executionProvider(values), embeddings: embeds?.source });
    const shape = embeds?.prompt ? embeds.prompt.dims.slice(0, 2) : [rows.length, Math.max(...rows.map((r) => r.length))];
    progress.stage(`forward over ${shape[0]} x ${shape[1]} tokens`);
    const logits = embeds?.prompt ? await session.forwardEmbeds(embeds.prompt.data, embeds.prompt.dims) : await session.forward(rows, { pad });
    progress.stop();
    const [B, S, V] = logits.dims;
    if (values.json) {
      const ids = embeds?.prompt ? null : padRows(rows, session.padSide(pad)).ids;
      const nested = Array.from({ length: B }, (_, b) =>
        Array.from({ length: S }, (_, s) => Array.from(logits.data.subarray((b * S + s) * V, (b * S + s + 1) * V))),
      );
      const mask = session.attentionMask();
      const width = mask[0]!.length;
      const inputIds = ids ? mask.map((_, b) => ids.slice(b * width, (b + 1) * width)) : null;
      io.out(JSON.stringify({ logits: nested, dims: [B, S, V], attentionMask: mask, inputIds, positions: session.logits }));
    } else {
      io.out(`logits [${B}, ${S}, ${V}]${session.logits === 'last' ? " (each row's last real token only)" : ''}`);
      session.lastReal(logits).forEach((l, b) => io.out(`  row ${b}: last real token argmax ${argmax(l)} (logit ${l[argmax(l)]!.toFixed(4)})`));
    }
    return 0;
  },
};
