/** `modc calibrate`: fit routers that keep quality from a model and a little data; write the router file. */
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { calibrate, checkCalibrateOptions, DEFAULTS, MARGIN_WITHOUT_SURROGATES, type Progress } from '../../apps/calibration/calibrate.js';
import { readDataset } from '../../apps/data/index.js';
import type { Granularity } from '../../apps/calibration/parts.js';
import { routerFileMetadata, writeCalibratedRouters } from '../../apps/calibration/router-file.js';
import { TARGET_KINDS, type TargetKind } from '../../apps/calibration/targets.js';
import { ModcError, UsageError } from '../../core/errors.js';
import { decoderIo } from '../../metadata/decoder-io.js';
import { requireLogits } from '../../metadata/logits-metadata.js';
import { loadModel } from '../../core/io/load.js';
import { checkOutputPath } from '../../core/io/save.js';
import type { Command, Progress as ProgressReporter } from '../command.js';
import { intFlag, numberFlag, onePositional, oneOf, progressOf, stringFlag } from '../shared.js';

const STAGES: Record<Progress['stage'], string> = {
  capture: 'capturing activations',
  fit: 'fitting routers',
  score: 'scoring tokens',
  sensitivity: 'measuring sensitivity',
  refit: 'refitting surrogates',
  refine: 'refining thresholds',
  done: 'done',
};

/** Feeds calibrate()'s stage reports to the shared progress reporter (a bar on a TTY). */
function reportTo(progress: ProgressReporter): (p: Progress) => void {
  let stage = '';
  let shown = 0;
  return (p) => {
    if (p.stage === 'done') return progress.stop();
    if (p.stage !== stage) {
      stage = p.stage;
      shown = 0;
      progress.stage(STAGES[p.stage], p.total || undefined);
    }
    if (p.done > shown) {
      progress.tick(p.done - shown);
      shown = p.done;
    }
  };
}

export const calibrateCommand: Command = {
  name: 'calibrate',
  summary: 'fit routers that keep quality, from the model and a little data (writes a router file)',
  usage:
    'modc calibrate MODEL.onnx --data FILE -o ROUTERS.safetensors --target-compute F [--granularity auto|block|attention|mlp] [--routing threshold|topk] [--max-tokens N] [--seed S] [--json]',
  details: [
    'Runs the original model over the data batch by batch (bounded memory), fits one router per',
    "routed part in closed form (ridge regression of each token's update norm, relative to the",
    "stream it is added to, on the part's input), measures each part's NLL increase when routed",
    'alone, and routes the parts that cost least per compute saved until the compute fraction',
    '(MACs run / dense MACs) is at most F. Thresholds are set on the data and baked into the',
    'router biases (p = 0.5). By default each MLP part also gets low-rank linear surrogates of its',
    'update (ranks of about 5% and 10% of its MACs, tried as alternatives): a token the MLP skips gets',
    "the surrogate's output, the router predicts the surrogate's error, and a part may be replaced",
    'by its surrogate on every token (capacity 0); the chosen surrogates are then refitted in layer',
    "order with every chosen part routed (--no-refit keeps the first fit). The file's __metadata__ records",
    'mode, gating, per-part capacities and thresholds, surrogates, the calibration data (path, lines,',
    'sha256) and the calibration report, so',
    '`modc compile MODEL.onnx --routers ROUTERS.safetensors -o OUT.onnx` needs no other flag.',
    'DATA: one sequence per line, JSON lines {"ids": [1, 2, 3]} or plain text tokenized by the',
    'tokenizer.json beside the model (as for modc eval).',
  ].join('\n'),
  options: {
    data: { type: 'string', valueName: 'FILE', help: 'calibration data (JSON lines {"ids": [...]}, or text with a tokenizer.json beside the model)' },
    output: { type: 'string', short: 'o', valueName: 'FILE', help: 'router file to write (safetensors)' },
    'target-compute': { type: 'string', valueName: 'F', help: 'compute fraction to reach, in (0, 1] (required)' },
    granularity: { type: 'string', valueName: 'G', help: 'auto (default: block, attention and mlp parts), block, attention or mlp' },
    routing: { type: 'string', valueName: 'MODE', help: 'threshold (default) or topk: the mode recorded for compile' },
    'max-tokens': { type: 'string', valueName: 'N', help: `use at most N tokens of the data (default ${DEFAULTS.maxTokens})` },
    'max-length': { type: 'string', valueName: 'N', help: "split longer sequences into pieces of at most N tokens (default: the model's context)" },
    seed: { type: 'string', valueName: 'S', help: 'seed for the order sequences are drawn in (default 0); same seed, same file' },
    target: { type: 'string', valueName: 'KIND', help: `importance target: ${TARGET_KINDS.join(', ')} (default ${DEFAULTS.target})` },
    gated: { type: 'boolean', help: 'record gated routing (out = x + r (y - x)); default ungated' },
    'sensitivity-tokens': {
      type: 'string',
      valueName: 'N',
      help: 'tokens per sensitivity measurement (default: about 6 passes over the data in all, 1024-8192 each)',
    },
    margin: {
      type: 'string',
      valueName: 'M',
      help: `aim M below the target on the calibration data (default ${DEFAULTS.margin}, ${MARGIN_WITHOUT_SURROGATES} with --surrogate none)`,
    },
    surrogate: { type: 'string', valueName: 'KIND', help: 'lowrank (default): MLP parts get linear surrogates; none: a skipped token gets no update' },
    'no-refit': { type: 'boolean', help: 'keep the surrogates as first fitted (default: refitted in layer order with the chosen parts routed)' },
    'surrogate-ranks': { type: 'string', valueName: 'R,R', help: "surrogate ranks tried per MLP part (default: about 5% and 10% of the MLP's MACs)" },
    json: { type: 'boolean', help: 'print the calibration report as JSON' },
    quiet: { type: 'boolean', short: 'q', help: 'no progress or summary on stderr' },
  },
  async run(positionals, values, io) {
    const modelPath = onePositional(positionals, 'model path', 'calibrate');
    const data = stringFlag(values, 'data');
    if (!data) throw new UsageError('missing --data FILE');
    const output = stringFlag(values, 'output');
    if (!output) throw new UsageError('missing -o ROUTERS.safetensors');
    const targetCompute = numberFlag(values, 'target-compute');
    if (targetCompute === undefined) throw new UsageError('missing --target-compute F');
    const opts = {
      targetCompute,
      granularity: oneOf<Granularity>(values, 'granularity', ['auto', 'block', 'attention', 'mlp']) ?? DEFAULTS.granularity,
      mode: oneOf(values, 'routing', ['threshold', 'topk'] as const) ?? 'threshold',
      maxTokens: intFlag(values, 'max-tokens', DEFAULTS.maxTokens, 2),
      seed: intFlag(values, 'seed', DEFAULTS.seed, 0),
      target: oneOf<TargetKind>(values, 'target', TARGET_KINDS) ?? DEFAULTS.target,
      gated: !!values.gated,
      sensitivityTokens: values['sensitivity-tokens'] !== undefined ? intFlag(values, 'sensitivity-tokens', 0, 2) : undefined,
      margin: numberFlag(values, 'margin'),
      surrogate: oneOf(values, 'surrogate', ['none', 'lowrank'] as const) ?? DEFAULTS.surrogate,
      surrogateRanks: ranksFlag(stringFlag(values, 'surrogate-ranks')),
      refit: !values['no-refit'],
    };
    checkCalibrateOptions(opts);
    if (opts.margin !== undefined && !(opts.margin >= 0 && opts.margin < 1)) throw new UsageError(`--margin must be in [0, 1), got ${opts.margin}`);
    if (!existsSync(modelPath)) throw new ModcError(`cannot read model ${modelPath}: no such file`);
    const model = loadModel(modelPath);
    requireLogits(model, 'calibrate');
    checkOutputPath(output, model); // never over the model or its data files; writable, before any work
    if (resolve(output) === resolve(data)) throw new ModcError(`refusing to overwrite the calibration data ${output}; choose another output path`);
    const { vocabSize, maxPositions } = decoderIo(model);
    const maxLength = values['max-length'] === undefined ? (maxPositions ?? undefined) : intFlag(values, 'max-length', 0, 2);
    if (maxLength !== undefined && maxPositions !== null && maxLength > maxPositions) {
      throw new UsageError(`--max-length ${maxLength} is longer than the model's context of ${maxPositions} positions`);
    }
    const sequences = readDataset(data, { model: modelPath, vocabSize, maxLength });

    const quiet = !!values.quiet;
    const result = await calibrate(model, sequences, { ...opts, onProgress: reportTo(progressOf(io)) });
    mkdirSync(dirname(resolve(output)), { recursive: true });
    const r = result.report;
    const dataRecord = { path: data, ...fileRecord(data), tokens: r.tokens, sequences: r.sequences };
    writeCalibratedRouters(output, result, routerFileMetadata(result, dataRecord));
    if (values.json) {
      io.out(JSON.stringify({ output, mode: result.mode, gated: result.gated, data: dataRecord, ...r }, null, 2));
    } else if (!quiet) {
      io.err(
        `calibrated on ${r.tokens} tokens (${r.sequences} sequences): dense NLL ${r.denseNll.toFixed(4)}, routed NLL ${r.nll.toFixed(4)}, compute fraction ${r.computeFraction.toFixed(3)} (target ${targetCompute})`,
      );
      for (const p of r.parts) {
        const sur = p.surrogate ? `, surrogate rank ${p.surrogate.rank} (R2 ${p.surrogate.r2.toFixed(2)})` : '';
        if (p.surrogate && p.capacity <= 0) io.err(`  layer ${p.layer} ${p.part}: replaced by its surrogate on every token${sur}`);
        else
          io.err(`  layer ${p.layer} ${p.part}: capacity ${p.capacity.toFixed(3)}, selected ${p.selectedFraction.toFixed(3)}, fit R2 ${p.r2.toFixed(2)}${sur}`);
      }
      io.err(
        `wrote ${output}: ${result.routers.length} router(s)${result.replaced.length ? `, ${result.replaced.length} MLP(s) replaced by surrogates` : ''}, ${result.mode}, ${result.gated ? 'gated' : 'ungated'}`,
      );
    }
    return 0;
  },
};

/** `--surrogate-ranks 16,32`: positive integers. */
function ranksFlag(v: string | undefined): number[] | undefined {
  if (v === undefined) return undefined;
  const ranks = v.split(',').map((x) => Number(x.trim()));
  if (ranks.length === 0 || ranks.some((r) => !(Number.isInteger(r) && r >= 1)))
    throw new UsageError(`--surrogate-ranks must be a comma-separated list of integers >= 1, got '${v}'`);
  return ranks;
}

/** The data file's lines and sha256, as the router file records them. */
function fileRecord(path: string): { lines: number; sha256: string } {
  const bytes = readFileSync(path);
  const text = bytes.toString('utf8');
  const lines = text.split('\n').filter((l) => l.trim() !== '').length;
  return { lines, sha256: createHash('sha256').update(bytes).digest('hex') };
}
