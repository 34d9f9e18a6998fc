/**
 * Analysis and compile at scale: build Llama-7B-shaped graphs (builder forms, weights in a sparse
 * sidecar that is never read), then time load, analyzeDecoder and the default MoD compile in
 * process; and compile 7B-, 70B- and 405B-shaped graphs with `modc compile` in a fresh process
 * each (bench/compile-probe.ts), which reports its time, peak resident memory and weight bytes
 * read.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { loadModel } from '../compiler/core/io/load.js';
import { externalReads } from '../compiler/core/ir/tensor.js';
import { runPipeline } from '../compiler/passes/pass-manager.js';
import { planRouting } from '../compiler/routing/routing-plan.js';
import { writeGenaiModel, writeLlamaModel } from '../fixtures/builder/index.js';
import { modPipeline } from '../compiler/passes/pipeline.js';
import { median, parseFlags, table, type FlagSpecs } from './common.js';
import { UsageError } from '../compiler/core/errors.js';

export const ANALYSIS_FLAGS = {
  runs: { kind: 'int', default: 5, help: 'in-process runs of the 7B analysis (median)' },
  'compile-runs': { kind: 'int', default: 3, help: 'fresh-process modc compile runs per shape (median time, largest peak memory)' },
  shapes: { kind: 'string', default: '7b,70b,405b', help: 'shapes compiled in a fresh process: any of 7b, 70b, 405b' },
  json: { kind: 'bool', default: false, help: 'print the results as one JSON object on stdout' },
  quick: { kind: 'bool', default: false, help: 'one run each, 7B only' },
  'default-malloc': { kind: 'bool', default: false, help: 'keep glibc malloc defaults (see run.js --help)' },
} satisfies FlagSpecs;

export const ANALYSIS_USAGE = `usage: node dist/bench/run.js analysis [flags]

1. Builds 32-layer Llama-7B-shaped graphs (hidden 4096, intermediate 11008, vocab 32000) in the
   Llama and GenAI forms with sparse external weights, and prints median times of loading,
   analyzeDecoder (first call and warm) and the MoD compile of every other layer, with the
   weight bytes read (must be 0).
2. Builds Llama-form graphs shaped like Llama 7B, 70B (80 layers, hidden 8192) and 405B (126
   layers, hidden 16384), sparse external weights, and runs \`modc compile --router-init random
   --schedule every-other\` on each in a fresh process: wall time of the compile, peak resident
   memory of that process (node itself included), weight bytes read. Targets: the 405B graph in
   under 10 s and 300 MB, weights never read.

${Object.entries(ANALYSIS_FLAGS)
  .map(([k, v]) => `  --${k}${v.kind === 'bool' ? '' : ' V'}  ${v.help} (default: ${v.default})`)
  .join('\n')}`;

const LLAMA_7B = { hiddenSize: 4096, numLayers: 32, numHeads: 32, numKvHeads: 32, intermediateSize: 11008, vocabSize: 32000, maxPositions: 4096 };
const SHAPES = {
  '7b': LLAMA_7B,
  '70b': { hiddenSize: 8192, numLayers: 80, numHeads: 64, numKvHeads: 8, intermediateSize: 28672, vocabSize: 128256, maxPositions: 8192 },
  '405b': { hiddenSize: 16384, numLayers: 126, numHeads: 128, numKvHeads: 8, intermediateSize: 53248, vocabSize: 128256, maxPositions: 8192 },
} as const;

interface ProbeResult {
  code: number;
  compileMs: number;
  cpuMs: number;
  peakRssBytes: number;
  rssBeforeCompileBytes: number;
  weightBytesRead: number;
  stderr: string;
}

/** `modc compile` of `model` in a fresh node process (bench/compile-probe.js next to this file). */
function probeCompile(model: string, out: string): ProbeResult & { processMs: number } {
  const probe = new URL('./compile-probe.js', import.meta.url).pathname;
  const t0 = performance.now();
  const child = spawnSync(process.execPath, [probe, model, out, '--router-init', 'random', '--schedule', 'every-other'], {
    encoding: 'utf8',
    maxBuffer: 1 << 24,
  });
  const processMs = performance.now() - t0;
  const line = child.stdout.trim().split('\n').at(-1) ?? '';
  if (child.status !== 0 || !line.startsWith('{')) throw new Error(`compile probe failed on ${model}: ${child.stderr.trim() || line}`);
  return { ...(JSON.parse(line) as ProbeResult), processMs };
}

export async function analysisBench(argv: readonly string[]): Promise<void> {
  const f = parseFlags(argv, ANALYSIS_FLAGS);
  const runs = f.quick ? 1 : f.runs;
  const compileRuns = f.quick ? 1 : f['compile-runs'];
  const shapes = (f.quick ? '7b' : f.shapes).split(',').map((x) => x.trim().toLowerCase());
  for (const sh of shapes) if (!(sh in SHAPES)) throw new UsageError(`--shapes: unknown shape '${sh}' (known: ${Object.keys(SHAPES).join(', ')})`);
  const dir = mkdtempSync(join(tmpdir(), 'modc-bench-analysis-'));
  const log = (m: string) => process.stderr.write(`[bench] ${m}\n`);
  try {
    const rows: string[][] = [];
    const forms: Record<string, unknown>[] = [];
    for (const [form, write] of [
      ['llama', writeLlamaModel],
      ['genai', writeGenaiModel],
    ] as const) {
      const path = join(dir, form, 'model.onnx');
      let t0 = performance.now();
      write(LLAMA_7B, { kind: 'external', path: 'model.onnx.data', sparse: true }, path);
      const buildMs = performance.now() - t0;
      const reads = externalReads.bytes;
      const load: number[] = [];
      const analyse: number[] = [];
      const compile: number[] = [];
      let first = 0;
      let nodes = 0;
      for (let r = 0; r < runs; r++) {
        t0 = performance.now();
        const model = loadModel(path);
        load.push(performance.now() - t0);
        t0 = performance.now();
        const s = analyzeDecoder(model);
        const ms = performance.now() - t0;
        if (r === 0) first = ms;
        analyse.push(ms);
        nodes = model.graph.nodes.length;
        const plan = planRouting({ numLayers: s.layers.length, hiddenSize: s.hiddenSize, routers: { kind: 'random', seed: 1 }, schedule: 'every-other' });
        t0 = performance.now();
        runPipeline(model, modPipeline({ plan }));
        compile.push(performance.now() - t0);
      }
      const warm = median(analyse.slice(1).length ? analyse.slice(1) : analyse);
      const fmt = (v: number) => `${v.toFixed(1)} ms`;
      const read = externalReads.bytes - reads;
      rows.push([form, String(nodes), fmt(buildMs), fmt(median(load)), fmt(first), fmt(warm), fmt(median(compile)), String(read)]);
      forms.push({ form, nodes, buildMs, loadMs: median(load), analyseFirstMs: first, analyseWarmMs: warm, compileMs: median(compile), weightBytesRead: read });
      log(`7B ${form}: done`);
    }

    const scale: Record<string, unknown>[] = [];
    const scaleRows: string[][] = [];
    for (const sh of shapes) {
      const cfg = SHAPES[sh as keyof typeof SHAPES];
      const path = join(dir, `scale-${sh}`, 'model.onnx');
      const t0 = performance.now();
      const saved = writeLlamaModel(cfg, { kind: 'external', path: 'model.onnx.data', sparse: true }, path);
      const buildMs = performance.now() - t0;
      const nodes = loadModel(path).graph.nodes.length;
      const probes = Array.from({ length: compileRuns }, (_, r) => {
        const res = probeCompile(path, join(dir, `scale-${sh}`, `mod-${r}.onnx`));
        log(
          `${sh}: compile ${(res.compileMs / 1000).toFixed(2)} s wall, ${(res.cpuMs / 1000).toFixed(2)} s CPU, peak RSS ${(res.peakRssBytes / 2 ** 20).toFixed(0)} MiB`,
        );
        return res;
      });
      const compileMs = median(probes.map((p) => p.compileMs));
      const cpuMs = median(probes.map((p) => p.cpuMs));
      const processMs = median(probes.map((p) => p.processMs));
      const peak = Math.max(...probes.map((p) => p.peakRssBytes));
      const read = Math.max(...probes.map((p) => p.weightBytesRead));
      const is405 = sh === '405b';
      const met = compileMs < 10_000 && peak < 300 * 2 ** 20 && read === 0;
      const metAlone = cpuMs < 10_000 && peak < 300 * 2 ** 20 && read === 0;
      scale.push({
        shape: sh,
        config: cfg,
        nodes,
        modelFileBytes: saved.bytes,
        buildMs,
        compileMs,
        cpuMs,
        processMs,
        peakRssBytes: peak,
        rssBeforeCompileBytes: median(probes.map((p) => p.rssBeforeCompileBytes)),
        weightBytesRead: read,
        runs: probes.length,
        ...(is405 ? { target: { compileMsBelow: 10_000, peakRssBytesBelow: 300 * 2 ** 20, weightBytesRead: 0, met, metOnCpuTime: metAlone } } : {}),
      });
      scaleRows.push([
        sh.toUpperCase(),
        `${cfg.numLayers} x ${cfg.hiddenSize}`,
        String(nodes),
        `${(buildMs / 1000).toFixed(1)} s`,
        `${(compileMs / 1000).toFixed(2)} s`,
        `${(cpuMs / 1000).toFixed(2)} s`,
        `${(processMs / 1000).toFixed(2)} s`,
        `${(peak / 2 ** 20).toFixed(0)} MiB`,
        String(read),
        is405 ? '< 10 s, < 300 MB, 0 bytes' : '',
        is405 ? `${met ? 'yes' : '**no**'} (wall), ${metAlone ? 'yes' : '**no**'} (CPU time)` : '',
      ]);
    }

    if (f.json) {
      console.log(
        JSON.stringify(
          {
            bench: 'analysis',
            command: `npm run bench -- analysis ${argv.join(' ')}`.trimEnd(),
            date: new Date().toISOString(),
            logicalCores: cpus().length,
            node: process.version,
            runs,
            forms7b: forms,
            compileScale: scale,
          },
          null,
          2,
        ),
      );
      return;
    }
    console.log(`## Analysis of 32-layer 7B-shaped graphs (median of ${runs} runs)\n`);
    console.log(table(['form', 'nodes', 'build + save', 'load', 'analyse (first)', 'analyse (warm)', 'MoD compile (16 layers)', 'weight bytes read'], rows));
    if (scaleRows.length) {
      console.log(
        `\n## modc compile at scale: Llama form, sparse external weights, --router-init random --schedule every-other (fresh process per run; median time of ${compileRuns}, largest peak RSS)\n`,
      );
      console.log(`command: npm run bench -- analysis ${argv.join(' ')}`.trimEnd());
      console.log(`machine: ${cpus()[0]?.model ?? 'unknown CPU'}, ${cpus().length} logical cores, node ${process.version}; date ${new Date().toISOString()}\n`);
      console.log(
        'The compile is single-threaded: its CPU time is the wall time it takes on an otherwise idle core. Wall time on a shared machine is longer by the load (1-minute load average at the end of this run: ' +
          loadavg()[0]!.toFixed(1) +
          ` on ${cpus().length} cores).\n`,
      );
      console.log(
        table(
          [
            'shape',
            'layers x hidden',
            'nodes',
            'build + save (sparse)',
            'modc compile, wall (load, analyse, passes, save)',
            'modc compile, CPU time',
            'process wall (node start to exit)',
            'peak RSS of the process',
            'weight bytes read',
            'target',
            'met',
          ],
          scaleRows,
        ),
      );
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
