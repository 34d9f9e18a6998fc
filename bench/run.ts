/**
 * Benchmark dispatcher: `node dist/bench/run.js prefill|decode|profile|analysis [flags]` (or
 * `npm run bench -- NAME [flags]`). Tables go to stdout, progress to stderr.
 */
import { fileURLToPath } from 'node:url';
import { rerunWithMallocEnv } from '../compiler/apps/benchmark/benchmark.js';
import { ModcError } from '../compiler/core/errors.js';
import { MALLOC_ENV } from './common.js';
import { ANALYSIS_USAGE, analysisBench } from './analysis.js';
import { DECODE_USAGE, decodeBench } from './decode.js';
import { KV_FRONTIER_USAGE, kvFrontierBench } from './kv-frontier.js';
import { LONG_CONTEXT_USAGE, longContextBench } from './long-context.js';
import { PREFILL_USAGE, prefillBench } from './prefill.js';
import { PROFILE_USAGE, profileBench } from './profile.js';
import { QUALITY_USAGE, qualityBench } from './quality.js';
import { RECIPE_USAGE, recipeBench } from './recipe.js';
import { SESSIONS_USAGE, sessionsBench } from './sessions.js';
import { TARGETS_USAGE, targetsBench } from './targets.js';
import { PLOT_USAGE, plotBench } from './plot.js';

const BENCHES: Record<string, { usage: string; run: (argv: readonly string[]) => Promise<void> }> = {
  prefill: { usage: PREFILL_USAGE, run: prefillBench },
  decode: { usage: DECODE_USAGE, run: decodeBench },
  profile: { usage: PROFILE_USAGE, run: profileBench },
  analysis: { usage: ANALYSIS_USAGE, run: analysisBench },
  'long-context': { usage: LONG_CONTEXT_USAGE, run: longContextBench },
  quality: { usage: QUALITY_USAGE, run: qualityBench },
  'kv-frontier': { usage: KV_FRONTIER_USAGE, run: kvFrontierBench },
  recipe: { usage: RECIPE_USAGE, run: recipeBench },
  sessions: { usage: SESSIONS_USAGE, run: sessionsBench },
  targets: { usage: TARGETS_USAGE, run: targetsBench },
  plot: { usage: PLOT_USAGE, run: plotBench },
};

const USAGE = `usage: node dist/bench/run.js <benchmark> [flags]   (npm run build && npm run bench -- <benchmark> [flags])

benchmarks:
  prefill   prefill time of the all-pass and routed compiles against the original (one pair alive at a time), and the ideal routed time
  decode    per-step decode ratios of the all-pass and routed compiles against the original (one pair alive at a time), KV bytes, achieved / ideal
  profile   ORT profile of one prefill (or decode step): where the time goes, by op and by layer
  analysis  load, analysis and MoD compile times of 7B-shaped graphs; modc compile of 7B/70B/405B shapes
  long-context  a small model at 8K/32K context: KV bytes, peak RSS, prefill and decode, original vs MoD
  quality   compute fraction vs held-out NLL: dense, calibrated and random routers (fixtures/quality-lm)
  kv-frontier  KV fraction vs held-out NLL: key/value routing (calibrated, random) against attention and block routing (both quality fixtures)
  recipe    the parts and capacities modc calibrate picks on fixtures/quality-lm, placed on the bench model: speedups next to the NLL increase
  sessions  one pair timed with 0 and with N extra idle sessions alive: per-step ratios, threads, resident memory
  targets   the decode benchmark over every form, granularity and context of the speed targets: one table, each target met or not
  plot      figures (SVG) from JSON: modc bench reports, modc eval results, bench quality --json

Every benchmark takes --quick (small sizes, for a smoke run) and --help.

On Linux the benchmarks re-run themselves with glibc's malloc told to keep freed memory
(${Object.entries(MALLOC_ENV)
  .map(([k, v]) => `${k}=${v}`)
  .join(' ')}): every decode step
frees and allocates the whole KV cache (8 MB tensors at 2K context), and with the defaults glibc
hands that memory back to the kernel and faults it in again (about 6000 page faults, 60-80 ms,
on every other step here), which buried the model's own time. The last setting puts the heap
on transparent huge pages (glibc 2.35 and later): on 4 KiB pages the session created first ran
its decode steps a few percent slower than the one created after it, so a pair's ratio depended
on the order the two loaded in. --default-malloc keeps the defaults.`;

async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (!name || name === '--help' || name === '-h' || name === 'help') {
    console.log(USAGE);
    return name ? 0 : 2;
  }
  const bench = BENCHES[name];
  if (!bench) {
    console.error(`bench: unknown benchmark '${name}'\n\n${USAGE}`);
    return 2;
  }
  if (rest.includes('--help') || rest.includes('-h')) {
    console.log(bench.usage);
    return 0;
  }
  try {
    await bench.run(rest);
    return 0;
  } catch (e) {
    if (e instanceof ModcError) {
      console.error(`bench: ${e.message}`);
      return e.exitCode;
    }
    throw e;
  }
}

const argv = process.argv.slice(2);
process.exitCode = rerunWithMallocEnv(fileURLToPath(import.meta.url), argv) ?? (await main(argv));
