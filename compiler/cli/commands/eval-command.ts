/** `modc eval`: NLL, perplexity, and the compute and KV-cache fractions of a model on data. */
import { loadDataset } from '../../apps/data/index.js';
import { UsageError } from '../../core/errors.js';
import { evaluate, type EvalResult } from '../../apps/eval/index.js';
import { type AgreementResult, greedyAgreement } from '../../apps/eval/agreement.js';
import { checkCompiledFrom } from '../../metadata/source-fingerprint.js';
import { readRoutingMetadata } from '../../metadata/routing-metadata.js';
import { loadModel } from '../../core/io/load.js';
import { decoderIo } from '../../metadata/decoder-io.js';
import { requireLogits } from '../../metadata/logits-metadata.js';
import type { Command } from '../command.js';
import { executionProvider, intFlag, onePositional, progressOf, stringFlag, table } from '../shared.js';

export const evalCommand: Command = {
  name: 'eval',
  summary: 'measure NLL, perplexity, compute and KV-cache fractions on data',
  usage: 'modc eval MODEL.onnx --data FILE [--max-length N] [--batch B] [--pad left|right] [--ep cpu|cuda] [--generate N --original ORIGINAL.onnx] [--json]',
  details: [
    'MODEL is an original or a modc-compiled model. FILE holds one sequence per line: JSON lines',
    '{"ids": [...]}, or plain text when a tokenizer.json sits beside the model. Each sequence is one',
    "forward pass; sequences longer than --max-length (default: the model's context, or no limit) are",
    'split. nll is the mean over every predicted token (each token after the first of a sequence), in',
    'nats. computeFraction: multiply-accumulates executed (routed parts on their selected tokens only)',
    '/ the dense model\'s on the same tokens; kvFraction: KV-cache entries held / dense (docs/commands.md, "Metrics").',
    'A kv part (key/value routing) runs every token; its attention is charged for the (query, key)',
    'pairs its rule leaves, and its cache for the sinks, kept tokens and window it holds after each',
    "sequence's last token. With --json it prints {nll, perplexity, tokens, computeFraction, kvFraction,",
    'layers: [{layer, part, routed, selectedFraction, kvFraction (kv parts), surrogate (MLP parts with',
    'one)}], data, settings, ...}. Progress goes to stderr (see --progress, --quiet).',
    '--generate N: after each sequence but its last N tokens, the dense ORIGINAL greedily decodes N tokens',
    "and the model is fed the same ids; it reports the fraction of steps where the model's top-1 token is",
    "the original's (generate: {tokens, prefixes, agreement, allAgree} in --json; allAgree: the fraction of",
    'sequences whose N tokens all agree). --original is the model MODEL was compiled from.',
  ].join('\n'),
  options: {
    data: { type: 'string', valueName: 'FILE', help: 'the data: JSON lines {"ids": [...]}, or text with a tokenizer.json beside the model' },
    'max-length': { type: 'string', valueName: 'N', help: "split longer sequences into pieces of at most N tokens (default: the model's context)" },
    batch: { type: 'string', valueName: 'B', help: 'sequences per forward pass, at most (default 8)' },
    pad: { type: 'string', valueName: 'SIDE', help: 'pad shorter sequences on the right (default) or left; GroupQueryAttention needs right' },
    ep: { type: 'string', valueName: 'EP', help: 'execution provider: cpu (default) or cuda' },
    json: { type: 'boolean', help: 'print the result as JSON' },
    generate: { type: 'string', valueName: 'N', help: 'greedy top-1 agreement with the dense original over N decoded tokens per sequence' },
    original: { type: 'string', valueName: 'FILE', help: 'the dense original MODEL was compiled from (with --generate)' },
  },
  async run(positionals, values, io) {
    const path = onePositional(positionals, 'model path', 'eval');
    const data = stringFlag(values, 'data');
    if (data === undefined) throw new UsageError('missing --data FILE');
    const batch = intFlag(values, 'batch', 8, 1);
    const pad = stringFlag(values, 'pad');
    if (pad !== undefined && pad !== 'left' && pad !== 'right') throw new UsageError(`--pad must be left or right, got '${pad}'`);
    const ep = executionProvider(values);
    const model = loadModel(path);
    requireLogits(model, 'eval');
    const { vocabSize, maxPositions } = decoderIo(model);
    const maxLength = values['max-length'] === undefined ? (maxPositions ?? undefined) : intFlag(values, 'max-length', 0, 1);
    if (maxLength !== undefined && maxPositions !== null && maxLength > maxPositions) {
      throw new UsageError(`--max-length ${maxLength} is longer than the model's context of ${maxPositions} positions`);
    }
    const generate = values.generate === undefined ? undefined : intFlag(values, 'generate', 0, 1);
    const original = stringFlag(values, 'original');
    if (original !== undefined && generate === undefined) throw new UsageError('--original is for --generate N');
    if (generate !== undefined && original === undefined && readRoutingMetadata(model))
      throw new UsageError(`--generate needs --original ORIGINAL.onnx: ${path} is modc-compiled`);
    if (original !== undefined) checkCompiledFrom(loadModel(original), model, original, path);
    const dataset = loadDataset(data, { model: path, vocabSize, maxLength });
    const progress = progressOf(io);
    let shown = 0;
    const onProgress = (done: number, total: number): void => {
      if (done === 0) progress.stage(`eval: ${total} sequences`, total);
      else progress.tick(done - shown);
      shown = done;
    };
    let result: EvalResult;
    try {
      result = await evaluate(model, dataset.sequences, { batchSize: batch, pad, executionProvider: ep, onProgress });
    } finally {
      progress.stop();
    }
    let agreement: AgreementResult | undefined;
    if (generate !== undefined) {
      progress.stage(`generate: ${generate} tokens after each of ${dataset.sequences.length} prefixes`);
      try {
        agreement = await greedyAgreement(path, original ?? path, dataset.sequences, { tokens: generate, batchSize: batch, pad, executionProvider: ep });
      } finally {
        progress.stop();
      }
    }
    const report = {
      model: path,
      data: { path: data, format: dataset.format, tokenizer: dataset.tokenizer, lines: dataset.lines, sequences: dataset.sequences.length },
      ...result,
      ...(agreement ? { generate: agreement } : {}),
      settings: { maxLength: maxLength ?? null, batch, pad: result.pad, ep },
    };
    if (values.json) {
      io.out(JSON.stringify(report));
      return 0;
    }
    const routing = result.routing ? `modc-compiled, ${result.routing.mode}${result.routing.gated ? ', gated' : ', ungated'}` : 'original';
    io.out(`model      ${path} (${routing})`);
    io.out(
      `data       ${data} (${dataset.format}${dataset.tokenizer ? `, ${dataset.tokenizer}` : ''}): ${dataset.lines} lines -> ${result.sequences} sequences, ${result.inputTokens} tokens${maxLength !== undefined ? `, max length ${maxLength}` : ''}`,
    );
    io.out(`nll        ${result.nll.toFixed(4)} nats per token over ${result.tokens} predicted tokens`);
    io.out(`perplexity ${result.perplexity.toFixed(3)}`);
    io.out(`compute    ${result.computeFraction.toFixed(4)} of the dense model's multiply-accumulates`);
    io.out(`kv cache   ${result.kvFraction.toFixed(4)} of the dense model's entries`);
    if (agreement)
      io.out(
        `generate   top-1 agreement ${agreement.agreement.toFixed(4)} with the original over ${agreement.tokens} greedy tokens after ${agreement.prefixes} prefixes (all ${agreement.tokens} agree on ${agreement.allAgree.toFixed(4)})`,
      );
    io.out('layers');
    const surrogates = result.layers.some((l) => l.surrogate);
    io.out(
      table([
        ['layer', 'part', 'selected', 'kv held', ...(surrogates ? ['surrogate'] : [])],
        ...result.layers.map((l) => [
          String(l.layer),
          l.routed ? l.part : 'dense',
          l.selectedFraction.toFixed(4),
          (l.kvFraction ?? (l.routed && l.part !== 'mlp' ? l.selectedFraction : 1)).toFixed(4),
          ...(surrogates ? [l.surrogate ? `rank ${l.surrogate.rank} on ${l.surrogate.fraction.toFixed(4)}` : '-'] : []),
        ]),
      ]).join('\n'),
    );
    return 0;
  },
};
