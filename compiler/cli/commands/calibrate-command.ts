/** `modc calibrate`: fit routers that keep quality from a model and a little data; write the router file. */
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import {
  calibrate,
  type CalibrationResult,
  checkCalibrateOptions,
  DEFAULTS,
  MARGIN_WITHOUT_SURROGATES,
  type Progress,
} from '../../apps/calibration/calibrate.js';
import { calibrateKv, calibrateKvWithCompute, checkKvCalibrateOptions, type KvProgress, kvRouterFileMetadata } from '../../apps/calibration/kv-calibrate.js';
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

const STAGES: Record<Progress['stage'] | KvProgress['stage'], string> = {
  capture: 'capturing activations',
  fit: 'fitting routers',
  score: 'scoring tokens',
  sensitivity: 'measuring sensitivity',
  refit: 'refitting surrogates',
  refine: 'refining thresholds',
  done: 'done',
};

/** Feeds calibrate()'s stage reports to the shared progress reporter (a bar on a TTY). */
function reportTo(progress: ProgressReporter): (p: Progress | KvProgress) => void {
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
    'modc calibrate MODEL.onnx --data FILE -o ROUTERS.safetensors (--target-compute F | --target-kv F | both) [--granularity auto|block|attention|mlp] [--routing threshold|topk] [--kv-sinks N] [--kv-window W] [--max-tokens N] [--seed S] [--json]',
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
    '',
    "--target-kv F routes every layer's KV cache (kv parts, key/value routing): every token runs the",
    'layer, and the cache keeps the first --kv-sinks tokens, the --kv-window most recent and the tokens',
    "its router keeps. The router is a ridge fit, on the layer's input, of log(1e-4 + the attention mass",
    "a token receives from queries at least the window later), from the dense model's attention",
    'probabilities (unfused attention); each layer gets the threshold that holds its KV fraction on the',
    'data (entries held after each sequence, sinks and window counted) at its share of F (the same for',
    'every layer; a share a layer cannot use passes to the others), refined once with',
    'every layer routed. With --target-compute too, the compute routers are MLP parts: key/value routing',
    'saves attention pairs by itself, so the MLP parts are calibrated for the rest (kv routers first,',
    'alone; then the MLP parts; then the kv thresholds again with the MLP parts routed); the file holds both.',
    'The MLP parts take surrogates there as they do without --target-kv (--surrogate, --surrogate-ranks,',
    '--no-refit apply), and the compute fraction charges each surrogate its MACs.',
  ].join('\n'),
  options: {
    data: { type: 'string', valueName: 'FILE', help: 'calibration data (JSON lines {"ids": [...]}, or text with a tokenizer.json beside the model)' },
    output: { type: 'string', short: 'o', valueName: 'FILE', help: 'router file to write (safetensors)' },
    'target-compute': { type: 'string', valueName: 'F', help: 'compute fraction to reach, in (0, 1]' },
    'target-kv': { type: 'string', valueName: 'F', help: "KV fraction to reach, in (0, 1]: routes every layer's KV cache (kv parts)" },
    'kv-sinks': { type: 'string', valueName: 'N', help: 'with --target-kv: the first N tokens stay keys/values (default 4)' },
    'kv-window': { type: 'string', valueName: 'W', help: 'with --target-kv: the W most recent tokens stay keys/values (default 16)' },
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
    const targetKv = numberFlag(values, 'target-kv');
    if (targetCompute === undefined && targetKv === undefined) throw new UsageError('missing --target-compute F (or --target-kv F)');
    if (targetKv === undefined && (values['kv-sinks'] !== undefined || values['kv-window'] !== undefined))
      throw new UsageError('--kv-sinks and --kv-window go with --target-kv');
    if (targetCompute === undefined && (values.surrogate !== undefined || values['surrogate-ranks'] !== undefined || values['no-refit'] !== undefined))
      throw new UsageError('--surrogate, --surrogate-ranks and --no-refit go with --target-compute (they shape the MLP parts calibrated for compute)');
    const granularity = oneOf<Granularity>(values, 'granularity', ['auto', 'block', 'attention', 'mlp']);
    if (targetKv !== undefined && granularity !== undefined && granularity !== 'mlp' && !(granularity === 'auto' && targetCompute !== undefined))
      throw new UsageError(
        `--granularity ${granularity} with --target-kv: every layer's KV cache is routed, so compute routing (--target-compute) can route MLP parts only`,
      );
    if (targetKv !== undefined && oneOf(values, 'routing', ['threshold', 'topk'] as const) === 'topk')
      throw new UsageError('--target-kv routes key/value parts, which are threshold-only: drop --routing topk');
    const kvOpts =
      targetKv === undefined
        ? null
        : {
            targetKv,
            sinks: values['kv-sinks'] !== undefined ? intFlag(values, 'kv-sinks', 0, 0) : undefined,
            window: values['kv-window'] !== undefined ? intFlag(values, 'kv-window', 0, 1) : undefined,
          };
    if (kvOpts) checkKvCalibrateOptions(kvOpts);
    const opts = {
      targetCompute: targetCompute ?? 1,
      granularity: targetKv !== undefined ? 'mlp' : (granularity ?? DEFAULTS.granularity),
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
    const onProgress = reportTo(progressOf(io));
    if (kvOpts) {
      const both =
        targetCompute !== undefined
          ? await calibrateKvWithCompute(model, sequences, { ...kvOpts, maxTokens: opts.maxTokens, seed: opts.seed, onProgress }, { ...opts, onProgress })
          : null;
      const compute = both?.compute ?? null;
      const kv = both?.kv ?? (await calibrateKv(model, sequences, { ...kvOpts, maxTokens: opts.maxTokens, seed: opts.seed, onProgress }));
      mkdirSync(dirname(resolve(output)), { recursive: true });
      const merged = { routers: [...(compute?.routers ?? []), ...kv.routers], replaced: compute?.replaced ?? [] } as unknown as CalibrationResult;
      writeCalibratedRouters(output, merged, kvRouterFileMetadata(kv, compute, { path: data, ...fileRecord(data) }));
      const k = kv.report;
      if (values.json) {
        io.out(JSON.stringify({ output, mode: 'threshold', kv: { policy: kv.kv, ...k }, ...(compute ? { compute: compute.report } : {}) }, null, 2));
      } else if (!quiet) {
        if (both && !compute)
          io.err(`compute: key/value routing alone reaches compute fraction ${k.computeFraction.toFixed(3)} (target ${targetCompute}): no MLP part routed`);
        if (compute)
          io.err(
            `compute: ${compute.report.parts.length} MLP part(s) calibrated for ${both!.computeTarget.toFixed(3)} alone (target ${targetCompute} plus what key/value routing saves)${compute.replaced.length ? `, ${compute.replaced.length} replaced by surrogates` : ''}`,
          );
        io.err(
          `calibrated on ${k.tokens} tokens (${k.sequences} sequences): dense NLL ${k.denseNll.toFixed(4)}, routed NLL ${k.nll.toFixed(4)}, KV fraction ${k.kvFraction.toFixed(3)} (target ${targetKv}; sinks ${kv.kv.sinks} and window ${kv.kv.window} alone: ${k.floor.toFixed(3)}), compute fraction ${k.computeFraction.toFixed(3)}`,
        );
        for (const l of k.layers)
          io.err(`  layer ${l.layer} kv: kept ${l.keptFraction.toFixed(3)}, held ${l.kvFraction.toFixed(3)}, fit R2 ${l.r2.toFixed(2)}`);
        for (const u of k.skipped) io.err(`  layer ${u.layer} kv: not routed: ${u.reason}`);
        io.err(`wrote ${output}: ${merged.routers.length} router(s), threshold`);
      }
      return 0;
    }
    const result = await calibrate(model, sequences, { ...opts, onProgress });
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
