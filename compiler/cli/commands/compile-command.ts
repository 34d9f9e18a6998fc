/** `modc compile`: load, analyse, run the MoD pipeline (or named passes), save. */
import { resolve } from 'node:path';
import { describeGenai, readGenaiConfig, writeGenaiConfig } from '../../apps/genai/genai-config.js';
import { ModcError, UsageError } from '../../core/errors.js';
import { loadModel } from '../../core/io/load.js';
import { checkOutputPath, saveModel } from '../../core/io/save.js';
import { analyzeDecoder } from '../../analysis/analyze.js';
import { graphFingerprint, recordSource } from '../../metadata/source-fingerprint.js';
import { compile, modcOpCounts, planFor, routingReport, type CompileReport, type CompileRequest, type ConvertedPart } from '../../passes/compile.js';
import { runPipeline, type PassRecord } from '../../passes/pass-manager.js';
import { defaultRegistry } from '../../passes/pipeline.js';
import { describeLayerPart, type RoutedPart, type RouterSource, type RoutingMode, type Schedule } from '../../routing/routing-plan.js';
import type { CliValues, Command } from '../command.js';
import { formatBytes, listFlag, numberFlag, onePositional, oneOf, progressOf, routedLayerJson, short, stringFlag } from '../shared.js';

function routerSource(values: CliValues): RouterSource | undefined {
  const file = stringFlag(values, 'routers');
  const init = stringFlag(values, 'router-init');
  if (file && init) throw new UsageError('give either --routers FILE or --router-init MODE, not both');
  if (file) return { kind: 'file', path: file };
  if (init === undefined) return undefined;
  if (init === 'all-pass') return { kind: 'all-pass' };
  if (init === 'random') {
    const seed = numberFlag(values, 'seed') ?? 0;
    if (!Number.isInteger(seed)) throw new UsageError(`--seed must be an integer, got ${seed}`);
    return { kind: 'random', seed };
  }
  throw new UsageError(`--router-init must be all-pass or random, got '${init}'`);
}

/** The routing request the flags describe; undefined without routers (a --passes run). */
function compileRequest(values: CliValues): CompileRequest | undefined {
  const routers = routerSource(values);
  if (!routers) {
    for (const flag of ['threshold', 'capacity', 'routing', 'layers', 'schedule', 'gated', 'ungated', 'inline-ops', 'granularity', 'kv-sinks', 'kv-window']) {
      if (values[flag] !== undefined) throw new UsageError(`--${flag} needs routers: give --routers FILE or --router-init all-pass|random`);
    }
    return undefined;
  }
  if (values.gated && values.ungated) throw new UsageError('give --gated or --ungated, not both');
  const mode = oneOf<RoutingMode>(values, 'routing', ['threshold', 'topk']);
  const threshold = numberFlag(values, 'threshold');
  const capacity = numberFlag(values, 'capacity');
  const schedule = oneOf<Schedule>(values, 'schedule', ['uniform', 'every-other', 'prd']);
  if (mode === 'topk' && threshold !== undefined) throw new UsageError('--threshold applies to --routing threshold; use --capacity with topk');
  // With a router file and no --routing, the file's metadata may choose topk.
  if ((mode ?? (routers.kind === 'file' ? undefined : 'threshold')) === 'threshold' && capacity !== undefined && schedule !== 'prd') {
    throw new UsageError('--capacity applies to --routing topk (or --schedule prd); use --threshold with threshold routing');
  }
  const logits = oneOf(values, 'logits', ['all', 'last'] as const);
  const kvSinks = numberFlag(values, 'kv-sinks');
  const kvWindow = numberFlag(values, 'kv-window');
  return {
    routers,
    mode,
    // Unset lets a router file's metadata decide (default gated).
    gated: values.ungated ? false : values.gated ? true : undefined,
    granularity: oneOf<RoutedPart>(values, 'granularity', ['block', 'attention', 'mlp', 'kv']),
    threshold,
    capacity,
    layers: stringFlag(values, 'layers'),
    schedule,
    inlineOps: !!values['inline-ops'],
    ...(logits ? { logits } : {}),
    ...(kvSinks !== undefined ? { kvSinks } : {}),
    ...(kvWindow !== undefined ? { kvWindow } : {}),
  };
}

export const compileCommand: Command = {
  name: 'compile',
  summary: 'turn a decoder into a Mixture-of-Depths model (or run named passes)',
  usage:
    'modc compile MODEL.onnx -o OUT.onnx (--routers FILE | --router-init all-pass|random) [options]\n       modc compile MODEL.onnx -o OUT.onnx --passes LIST',
  details: [
    'With routers, runs the MoD pipeline: record-costs, dense-past-length, split-fused-boundaries, insert-routers,',
    '[route-kv for kv parts,] route-layers, [last-logits with --logits last,] cleanup [, inline-modc-ops with --inline-ops]. Without',
    '--layers or --schedule, a router file converts exactly the layers it has routers for;',
    '--router-init converts every layer.',
    '',
    '--granularity says what a converted layer routes: its whole block (default), its attention',
    'sub-layer (a skipped token gets no attention update and is no key/value: the KV cache is',
    'compacted), its MLP (attention and the KV cache stay full), or its KV cache (kv: every token',
    'runs the layer; the cache keeps the first --kv-sinks tokens, the tokens the router keeps and the',
    '--kv-window most recent; threshold routing only). A router file sets the part per layer with',
    'router.{l}.attn.* / router.{l}.mlp.* / router.{l}.kv.* tensors; there --granularity keeps only',
    'that part\'s routers. The file\'s __metadata__ "modc" entry supplies mode, gating, per-part',
    'capacities and the kv sinks and window unless --routing, --gated/--ungated, --capacity,',
    '--kv-sinks or --kv-window are given.',
    '',
    'LIST is comma-separated pass names, each optionally with options `name{opt=value;opt=value}`.',
    '`--passes none` loads and saves the model unchanged (a round trip).',
    `passes: ${defaultRegistry()
      .list()
      .map((p) => `\n  ${p.name.padEnd(22)} ${p.description}`)
      .join('')}`,
    '',
    'The output is written atomically (temp file, then rename) and never over the input. External',
    "weights stay referenced when the output is in the input's folder, and are hard-linked (or",
    'copied) next to the output otherwise, so the output folder is self-contained.',
    'A genai_config.json beside the input is rewritten beside the output, and the summary says whether',
    'onnxruntime-genai can still drive the model (docs/serving.md, "onnxruntime-genai").',
  ].join('\n'),
  options: {
    output: { type: 'string', short: 'o', valueName: 'OUT.onnx', help: 'where to write the compiled model (required)' },
    routers: { type: 'string', valueName: 'FILE', help: 'router weights (safetensors: router.{l}[.attn|.mlp|.kv].weight/bias[/threshold], F32/F16/BF16)' },
    granularity: { type: 'string', valueName: 'PART', help: 'what a converted layer routes: block (default), attention, mlp or kv (its KV cache)' },
    'kv-sinks': { type: 'string', valueName: 'N', help: "kv routing: the first N tokens stay keys/values (default: the router file's, else 4)" },
    'kv-window': { type: 'string', valueName: 'W', help: "kv routing: the W most recent tokens stay keys/values (default: the router file's, else 16)" },
    'router-init': { type: 'string', valueName: 'MODE', help: 'all-pass (every token selected) or random (seeded, --seed N)' },
    seed: { type: 'string', valueName: 'N', help: 'seed for --router-init random (default 0)' },
    routing: { type: 'string', valueName: 'MODE', help: 'threshold (default: sigmoid(score) >= p) or topk (capacity per row)' },
    threshold: { type: 'string', valueName: 'P', help: 'threshold p in [0, 1] (default 0.5; a threshold in the router file wins)' },
    capacity: { type: 'string', valueName: 'C', help: 'top-k capacity in (0, 1] (default 0.5; the mean retention for --schedule prd)' },
    layers: { type: 'string', valueName: 'SPEC', help: 'layers to convert: all, even, odd, or a list like 1,3,5-7' },
    schedule: { type: 'string', valueName: 'NAME', help: 'uniform (default), every-other (layers 1,3,5,...), or prd (p-MoD progressive ratio decay)' },
    gated: { type: 'boolean', help: 'out = x + r * (y - x) for selected tokens (default)' },
    ungated: { type: 'boolean', help: 'out = y for selected tokens' },
    'inline-ops': { type: 'boolean', help: 'emit the modc op bodies inline instead of as local functions' },
    logits: {
      type: 'string',
      valueName: 'WHICH',
      help: "all (default: logits [B, S, V]) or last (the lm_head for each row's last real token only: [B, 1, V])",
    },
    passes: { type: 'string', valueName: 'LIST', help: 'run these passes instead of the MoD pipeline (`none` for a round trip)' },
    'dump-after': { type: 'string', multiple: true, valueName: 'PASS', help: 'after PASS (or `*`), write the model as NN-PASS.onnx and .txt' },
    'dump-dir': { type: 'string', valueName: 'DIR', help: "folder for dumps (default: the output's folder)" },
    'no-verify': { type: 'boolean', help: 'skip the IR verifier between passes' },
    'external-data-threshold': { type: 'string', valueName: 'BYTES', help: 'write new tensors of at least BYTES to OUT.onnx.data (default: only past 2 GB)' },
    json: { type: 'boolean', help: 'print a JSON report on stdout' },
    quiet: { type: 'boolean', short: 'q', help: 'no progress on stderr' },
  },
  async run(positionals, values, io) {
    const input = onePositional(positionals, 'model path', 'compile');
    const output = stringFlag(values, 'output');
    if (!output) throw new UsageError('missing -o OUT.onnx');
    if (resolve(input) === resolve(output)) throw new ModcError(`refusing to overwrite the input model ${input}; choose another output path`);
    const passes = stringFlag(values, 'passes');
    const threshold = numberFlag(values, 'external-data-threshold');
    // Pipeline stages go to the progress reporter; the summary prints on success only, so a failure leaves one line.
    const progress = progressOf(io);
    const summary: string[] = [];
    const say = values.quiet || values.json ? () => {} : (m: string) => void summary.push(m);
    const log = (m: string): void => (/^\[\d+\/\d+\] /.test(m) ? progress.stage(`compile ${m}`) : say(m));

    if (passes !== undefined) defaultRegistry().parsePipeline(passes); // unknown names fail before loading
    if (values.logits !== undefined && passes !== undefined)
      throw new UsageError('--logits applies to the MoD pipeline; with --passes, name last-logits in LIST');
    const request = compileRequest(values);
    if (!request && passes === undefined) throw new UsageError('nothing to do: give --routers FILE or --router-init all-pass|random (or --passes LIST)');
    const t0 = performance.now();
    progress.stage(`load ${input}`);
    const model = loadModel(input);
    checkOutputPath(output, model); // before any work: never over the input or its data files
    const genai = readGenaiConfig(input); // onnxruntime-genai's config beside the input, rewritten beside the output
    log(`loaded ${input} (${model.graph.nodes.length} nodes) in ${(performance.now() - t0).toFixed(0)} ms`);
    const dumpAfter = listFlag(values, 'dump-after');
    const dumpDir = stringFlag(values, 'dump-dir') ?? resolve(output, '..');
    const verify = !values['no-verify'];
    let records: PassRecord[];
    let report: CompileReport | undefined;
    if (request && passes === undefined) {
      ({ records, report } = compile(model, { ...request, verify, dumpAfter, dumpDir, log }));
    } else {
      // Named passes; with routers, the MoD passes among them get the plan.
      const source = graphFingerprint(model);
      const opsBefore = modcOpCounts(model);
      const mod = request ? { plan: planFor(analyzeDecoder(model), request), inlineOps: request.inlineOps } : undefined;
      records = runPipeline(model, defaultRegistry(mod).parsePipeline(passes!), { verify, dumpAfter, dumpDir, log });
      if (mod) {
        recordSource(model, source);
        report = routingReport(model, mod.plan, opsBefore);
      }
    }
    for (const r of records)
      log(`  ${r.pass}: ${r.ms.toFixed(1)} ms, nodes ${r.nodesBefore} -> ${r.nodesAfter}${r.notes.length ? `\n    ${r.notes.join('\n    ')}` : ''}`);
    progress.stage(`save ${output}`);
    const saved = saveModel(model, output, threshold !== undefined ? { externalizeThreshold: threshold } : {});
    const genaiResult = genai ? writeGenaiConfig(genai, model, saved.path) : null;
    if (report) {
      const setting = (l: ConvertedPart) => (report!.mode === 'threshold' ? `p=${short(l.threshold)}` : `c=${short(l.capacity)}`);
      const what = (l: { part: RoutedPart }) => (l.part === 'block' ? '' : `${l.part}, `);
      log(
        `converted ${report.converted.length} layer(s): ${report.converted.map((l) => `${l.layer} (${what(l)}${setting(l)})`).join(', ')}; ${report.mode}, ${report.gated ? 'gated' : 'ungated'}`,
      );
      if (report.replaced.length)
        log(
          `MLP replaced by its surrogate (every token, no router): layer${report.replaced.length === 1 ? '' : 's'} ${report.replaced.map((r) => `${r.layer} (rank ${r.rank})`).join(', ')}`,
        );
      log(
        `modc ops added: ${
          Object.entries(report.opsAdded)
            .map(([op, n]) => `${op} ${n}`)
            .join(', ') || (request?.inlineOps ? 'none (inlined)' : 'none')
        }`,
      );
      for (const u of report.notConverted) log(`not converted: layer ${u.part ? describeLayerPart({ layer: u.layer, part: u.part }) : u.layer}: ${u.reason}`);
    }
    progress.stop();
    log(`wrote ${saved.path} (${formatBytes(saved.bytes)})${saved.externalFiles.map((f) => `, ${f.location} ${f.how}`).join('')}`);
    if (genaiResult) log(describeGenai(genaiResult));
    for (const m of summary) io.err(m);
    if (values.json) {
      io.out(
        JSON.stringify(
          {
            input,
            output: saved.path,
            bytes: saved.bytes,
            externalFiles: saved.externalFiles,
            passes: records,
            ...(genaiResult ? { genaiConfig: genaiResult } : {}),
            ...(report
              ? {
                  routing: {
                    mode: report.mode,
                    gated: report.gated,
                    converted: report.converted.map((l) => routedLayerJson(report!.mode, l)),
                    replaced: report.replaced,
                    notConverted: report.notConverted,
                    opsAdded: report.opsAdded,
                  },
                }
              : {}),
          },
          null,
          2,
        ),
      );
    }
    return 0;
  },
};
