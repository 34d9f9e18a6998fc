/** `modc compile`: load, run a pass pipeline, save. */
import { resolve } from 'node:path';
import { ModcError, UsageError } from '../errors.js';
import { loadModel } from '../io/load.js';
import { saveModel } from '../io/save.js';
import { runPipeline } from '../pass-manager.js';
import { defaultRegistry } from '../../passes/index.js';
import { listFlag, numberFlag, onePositional, stringFlag } from './args.js';
import type { Command } from './command.js';
import { formatBytes } from './format.js';

export const compileCommand: Command = {
  name: 'compile',
  summary: 'rewrite a model with a pass pipeline and save it',
  usage: 'modc compile MODEL.onnx -o OUT.onnx --passes LIST [options]',
  details: [
    'LIST is comma-separated pass names, each optionally with options: `cleanup,lift-constants`,',
    '`name{opt=value;opt=value}`. `--passes none` loads and saves the model unchanged (a round trip).',
    `passes: ${defaultRegistry().list().map((p) => `\n  ${p.name.padEnd(16)} ${p.description}`).join('')}`,
    '',
    'The output is written atomically (temp file, then rename) and never over the input. External',
    'weights stay referenced when the output is in the input\'s folder, and are hard-linked (or',
    'copied) next to the output otherwise, so the output folder is self-contained.',
  ].join('\n'),
  options: {
    output: { type: 'string', short: 'o', valueName: 'OUT.onnx', help: 'where to write the compiled model (required)' },
    passes: { type: 'string', valueName: 'LIST', help: 'pass pipeline to run (required; `none` for a round trip)' },
    'dump-after': { type: 'string', multiple: true, valueName: 'PASS', help: 'after PASS (or `*`), write the model as NN-PASS.onnx and .txt' },
    'dump-dir': { type: 'string', valueName: 'DIR', help: 'folder for dumps (default: the output\'s folder)' },
    'no-verify': { type: 'boolean', help: 'skip the IR verifier between passes' },
    'external-data-threshold': { type: 'string', valueName: 'BYTES', help: 'write new tensors of at least BYTES to OUT.onnx.data (default: only past 2 GB)' },
    json: { type: 'boolean', help: 'print a JSON report on stdout' },
    quiet: { type: 'boolean', short: 'q', help: 'no progress on stderr' },
  },
  async run(positionals, values, io) {
    const input = onePositional(positionals, 'model path', 'compile');
    const output = stringFlag(values, 'output');
    if (!output) throw new UsageError('missing -o OUT.onnx');
    const passes = stringFlag(values, 'passes');
    if (passes === undefined) throw new UsageError('missing --passes LIST (use `--passes none` for a plain round trip)');
    if (resolve(input) === resolve(output)) throw new ModcError(`refusing to overwrite the input model ${input}; choose another output path`);
    const steps = defaultRegistry().parsePipeline(passes);
    const threshold = numberFlag(values, 'external-data-threshold');
    const log = values.quiet || values.json ? () => {} : (m: string) => io.err(m);

    const t0 = performance.now();
    const model = loadModel(input);
    log(`loaded ${input} (${model.graph.nodes.length} nodes) in ${(performance.now() - t0).toFixed(0)} ms`);
    const records = runPipeline(model, steps, {
      verify: !values['no-verify'],
      dumpAfter: listFlag(values, 'dump-after'),
      dumpDir: stringFlag(values, 'dump-dir') ?? resolve(output, '..'),
      log,
    });
    for (const r of records) log(`  ${r.pass}: ${r.ms.toFixed(1)} ms, nodes ${r.nodesBefore} -> ${r.nodesAfter}${r.notes.length ? `; ${r.notes.join('; ')}` : ''}`);
    const saved = saveModel(model, output, threshold !== undefined ? { externalizeThreshold: threshold } : {});
    log(`wrote ${saved.path} (${formatBytes(saved.bytes)})${saved.externalFiles.map((f) => `, ${f.location} ${f.how}`).join('')}`);
    if (values.json) io.out(JSON.stringify({ input, output: saved.path, bytes: saved.bytes, externalFiles: saved.externalFiles, passes: records }, null, 2));
    return 0;
  },
};
