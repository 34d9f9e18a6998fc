/** `modc run`: one forward over a prompt (past length 0) on any model, original or compiled. */
import { UsageError } from '../errors.js';
import { loadModel } from '../io/load.js';
import { decoderIo } from '../runtime/decoder-io.js';
import { embeddingChoice } from '../runtime/embeddings.js';
import { argmax, ModSession, padRows } from '../runtime/session.js';
import type { ExecutionProvider } from '../runtime/ort.js';
import { onePositional, stringFlag } from './args.js';
import type { CliOption, Command } from './command.js';
import { parseIdRows } from './ids.js';
import { progressOf } from './progress.js';

export function executionProvider(values: Record<string, unknown>): ExecutionProvider {
  const ep = (values.ep as string | undefined) ?? 'cpu';
  if (ep !== 'cpu' && ep !== 'cuda') throw new UsageError(`--ep must be cpu or cuda, got '${ep}'`);
  return ep;
}

/** The --pad flag; undefined when absent (the model's default side: left, or right for GroupQueryAttention). */
export function padSide(values: Record<string, unknown>): 'left' | 'right' | undefined {
  const pad = values.pad as string | undefined;
  if (pad === undefined) return undefined;
  if (pad !== 'left' && pad !== 'right') throw new UsageError(`--pad must be left or right, got '${pad}'`);
  return pad;
}

/** Options `run` and `generate` share. */
export const PROMPT_OPTIONS = {
  ids: { type: 'string', valueName: 'IDS', help: 'token ids: rows separated by ";", ids by ","' },
  pad: { type: 'string', valueName: 'SIDE', help: 'pad shorter rows on the left or right (default left; right, the only side it takes, for GroupQueryAttention)' },
  ep: { type: 'string', valueName: 'EP', help: 'execution provider: cpu (default) or cuda' },
  embeds: { type: 'string', valueName: 'FILE', help: 'inputs_embeds decoders: the prompt as a [B, S, H] .npy/.safetensors tensor, or "random" (seeded embeddings of --ids); default: the embedding model genai_config.json names' },
  json: { type: 'boolean', help: 'print the result as JSON' },
} as const satisfies Record<string, CliOption>;

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
    const embeds = embeddingChoice(path, decoderIo(loadModel(path)), stringFlag(values, 'embeds'));
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
      const nested = Array.from({ length: B }, (_, b) => Array.from({ length: S }, (_, s) => Array.from(logits.data.subarray((b * S + s) * V, (b * S + s + 1) * V))));
      const mask = session.attentionMask();
      const width = mask[0]!.length;
      const inputIds = ids ? mask.map((_, b) => ids.slice(b * width, (b + 1) * width)) : null;
      io.out(JSON.stringify({ logits: nested, dims: [B, S, V], attentionMask: mask, inputIds, positions: session.logits }));
    } else {
      io.out(`logits [${B}, ${S}, ${V}]${session.logits === 'last' ? ' (each row\'s last real token only)' : ''}`);
      session.lastReal(logits).forEach((l, b) => io.out(`  row ${b}: last real token argmax ${argmax(l)} (logit ${l[argmax(l)]!.toFixed(4)})`));
    }
    return 0;
  },
};
