/** `modc bench`: speed and memory of an original and its compiled model, interleaved step by step. */
import { benchPair, type Spread } from '../../apps/benchmark/benchmark.js';
import { loadModel } from '../../core/io/load.js';
import { decoderIo } from '../../metadata/decoder-io.js';
import { checkOutputPath } from '../../core/io/save.js';
import type { Command } from '../command.js';
import { executionProvider, formatBytes, intFlag, modelPair, progressOf, stringFlag, table } from '../shared.js';

const span = (s: Spread, digits: number) => `${s.median.toFixed(digits)} ms (${s.min.toFixed(digits)} - ${s.max.toFixed(digits)})`;
const x = (v: number) => `${v.toFixed(3)}x`;

export const benchCommand: Command = {
  name: 'bench',
  summary: 'time prefill and decode, and measure KV bytes, of an original and its compiled model',
  usage:
    'modc bench ORIGINAL.onnx COMPILED.onnx [--prompt N] [--batch B] [--steps N] [--runs N] [--warmup N] [--threads N] [--spinning] [--ep cpu|cuda] [--default-malloc] [--json] [--plot OUT.svg]',
  details: [
    'Both models get the same pseudo-random prompt, interleaved: in each run both prefills, then',
    "both models' decode step 1, step 2, ...; which model goes first alternates. Reported: median",
    '(min - max) of the timed prefills and of every timed decode step, and compiled / original as',
    'the ratio of the medians and as the median of the per-run (prefill) and per-step (decode)',
    'ratios (with their min and max), which a change in machine load during the run does not skew.',
    'KV bytes and per-layer cache lengths are taken after the last run.',
    '',
    'It measures as the benchmarks do: only the two sessions alive, idle ORT workers blocking',
    'instead of spinning (session.intra_op.allow_spinning and inter_op.allow_spinning = 0; --spinning',
    "keeps ORT's default), and on Linux glibc malloc told to keep freed memory on huge pages: modc",
    'bench runs itself again with MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296',
    'GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (a variable already set keeps its value) unless all three',
    'are set or --default-malloc is given. Without the first two every decode step gives the KV',
    'cache back to the kernel and faults it in again (thousands of page faults per step); on 4 KiB',
    'pages the session created first runs a few percent slower than the other.',
    '',
    '--json prints',
    '  { settings: { ..., threads, spinning, logicalCores, malloc, liveSessions }, models: [{ model,',
    '    prefillMs, decodeMsPerToken, prefill: {min, median, max}, decode: {...}, prefillSamples,',
    '    decodeSamples, prefillCpuSamples, decodeCpuSamples, kvBytes, cacheLengths }],',
    '    ratios: [{ model, prefill: {ofMedians, medianOfPaired, paired: {min, median, max}},',
    '    decode: {...}, cpu: { prefill: {...}, decode: {...} }, kvBytes }] }',
  ].join('\n'),
  options: {
    prompt: { type: 'string', valueName: 'N', help: 'prompt length in tokens (default 128)' },
    batch: { type: 'string', valueName: 'B', help: 'rows (default 1)' },
    steps: { type: 'string', valueName: 'N', help: 'decode steps per run (default 16)' },
    runs: { type: 'string', valueName: 'N', help: 'timed runs (default 3)' },
    warmup: { type: 'string', valueName: 'N', help: 'untimed runs first (default 1)' },
    threads: { type: 'string', valueName: 'N', help: "ORT intra-op threads (default 0: ORT's default, one per physical core)" },
    spinning: { type: 'boolean', help: "let idle ORT worker threads spin (ORT's default; the benchmark turns it off)" },
    ep: { type: 'string', valueName: 'EP', help: 'execution provider: cpu (default) or cuda' },
    'default-malloc': {
      type: 'boolean',
      help: "keep glibc's malloc defaults instead of running again with MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / GLIBC_TUNABLES",
    },
    json: { type: 'boolean', help: 'print the report as JSON' },
    plot: { type: 'string', valueName: 'OUT.svg', help: 'also draw speedup and KV bytes vs capacity (the original at capacity 1) as an SVG' },
  },
  async run(positionals, values, io) {
    const [original, compiled] = modelPair(positionals);
    const progress = progressOf(io);
    const opts = {
      promptLength: intFlag(values, 'prompt', 128, 1),
      batch: intFlag(values, 'batch', 1, 1),
      steps: intFlag(values, 'steps', 16, 0),
      runs: intFlag(values, 'runs', 3, 1),
      warmup: intFlag(values, 'warmup', 1, 0),
      intraOpThreads: intFlag(values, 'threads', 0, 0),
      executionProvider: executionProvider(values),
      allowSpinning: values.spinning === true,
      log: () => progress.tick(),
    };
    const plot = stringFlag(values, 'plot');
    if (plot) checkOutputPath(plot); // before the timed work
    const vocab = decoderIo(loadModel(original)).vocabSize ?? 100;
    progress.stage(`bench: ${opts.warmup + opts.runs} runs of each model`, opts.warmup + opts.runs);
    const report = await benchPair(original, compiled, vocab, opts);
    progress.stop();
    // Vega loads only when a figure is asked for.
    if (plot) await (await import('../../apps/plot/bench-plot.js')).benchCapacity(report, plot);
    if (values.json) {
      io.out(JSON.stringify(report, null, 2));
      return 0;
    }
    const s = report.settings;
    const [a, b] = report.models as [(typeof report.models)[0], (typeof report.models)[0]];
    const r = report.ratios[0]!;
    io.out(
      `prompt ${s.promptLength} x batch ${s.batch}, ${s.steps} decode steps per run, ${s.runs} timed runs after ${s.warmup} warm-up, ${s.executionProvider} EP, intra-op threads ${s.threads} (${s.logicalCores} logical cores), spinning ${s.spinning}; malloc: ${s.malloc}; models interleaved step by step, only these ${s.liveSessions} sessions alive`,
    );
    io.out(
      table(
        [
          ['', 'prefill: median (min - max)', 'decode per token: median (min - max)', 'KV bytes'],
          ['original', span(a.prefill, 1), span(a.decode, 2), formatBytes(a.kvBytes)],
          ['compiled', span(b.prefill, 1), span(b.decode, 2), formatBytes(b.kvBytes)],
          ['compiled / original, ratio of medians', x(r.prefill.ofMedians), x(r.decode.ofMedians), x(r.kvBytes)],
          ['compiled / original, median of paired ratios', x(r.prefill.medianOfPaired), x(r.decode.medianOfPaired), ''],
          ['paired ratios, min - max', `${x(r.prefill.paired.min)} - ${x(r.prefill.paired.max)}`, `${x(r.decode.paired.min)} - ${x(r.decode.paired.max)}`, ''],
          ['process CPU time, median of paired ratios', x(r.cpu.prefill.medianOfPaired), x(r.cpu.decode.medianOfPaired), ''],
        ],
        '',
      ).join('\n'),
    );
    return 0;
  },
};
