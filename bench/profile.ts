/**
 * Where the time goes: ORT's own profiler (session option enableProfiling) on one prefill (or one
 * decode step) of the original, the all-pass compile and the MoD compile. Kernel times (per-run
 * mean over the profiled runs) are summed by op type and by layer; `summarize` says how a kernel
 * is charged to a layer. Wall times with profiling off are measured first: the profiler's own
 * cost per kernel event is what separates the two.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { loadModel } from '../compiler/core/io/load.js';
import { decoderIo } from '../compiler/metadata/decoder-io.js';
import { UsageError } from '../compiler/core/errors.js';
import { emptyTensor, ort } from '../compiler/runtime/ort.js';
import { typed } from '../compiler/runtime/session.js';
import {
  applyQuick,
  buildModel,
  collectGarbage,
  compileModel,
  environment,
  flagHelp,
  log,
  median,
  modelFlags,
  modelLine,
  ms,
  originalFeeds,
  parseFlags,
  pct,
  sessionOptions,
  settingsJson,
  table,
  tokenIds,
  Workdir,
  type FlagSpecs,
} from './common.js';

export const PROFILE_FLAGS = {
  ...modelFlags({ prompt: 1024, runs: 3, warmup: 2 }),
  mode: {
    kind: 'string',
    default: 'prefill',
    help: "'prefill' (the prompt) or 'decode' (one token after a zero past of --prompt tokens; converted layers hold ceil(c x prompt))",
  },
  top: { kind: 'int', default: 15, help: 'op types listed' },
} satisfies FlagSpecs;

export const PROFILE_USAGE = `node dist/bench/run.js profile [flags]

Runs the original, the all-pass compile and the MoD compile with ORT profiling on (--ep, CPU by
default), and sums the kernel times of the last run by op type and by layer.

${flagHelp(PROFILE_FLAGS)}`;

interface ProfileEvent {
  cat: string;
  name: string;
  ts: number;
  dur: number;
  args?: { op_name?: string; output_size?: string };
}

interface LayerTime {
  layer: number;
  /** Nodes of the original layer (named /model/layers.N/...). */
  original: number;
  /** Nodes the MoD passes added, inside the layer's If (masks, gathers, scatter, KV compaction). */
  routingInIf: number;
  /** Nodes the MoD passes added before the layer's If (router, selection, compaction of indices). */
  routingBefore: number;
}

interface Summary {
  wallMs: number;
  /** The same runs with profiling off: the difference is the profiler's own cost. */
  plainWallMs: number;
  /** Kernel events per run. */
  nodesPerRun: number;
  /** Sum of kernel times, control-flow nodes excluded (their subgraph nodes are counted). */
  kernelMs: number;
  /** Time of the outermost If nodes not spent in their subgraphs' kernels (nested Ifs counted once). */
  ifOverheadMs: number;
  /** If nodes run per run (nested ones included). */
  ifsPerRun: number;
  /**
   * Kernels per run whose outputs total at least 1 MiB, and the MB they write: at decode these
   * are the cache copies (Concat, the fused attention ops, a skipped layer's Identity), independent of machine load.
   */
  largeWrites: { count: number; mb: number };
  byOp: Map<string, { ms: number; count: number }>;
  byLayer: Map<number, LayerTime>;
  /** Original nodes outside the layers: prefix (embedding, mask, rotary) and suffix (norm, lm_head). */
  outside: number;
  names: Set<string>;
}

const CONTROL_FLOW = new Set(['If', 'Loop', 'Scan']);

function feedsFor(path: string, ids: number[], past: number, capacity: number): Record<string, ort.Tensor> {
  const io = decoderIo(loadModel(path));
  const feeds = originalFeeds(io, ids, past);
  for (const b of io.kv) {
    if (!b.pastLength && !b.pastValid) continue;
    const n = Math.ceil(capacity * past);
    const dims = b.layout === 'combined-2BHTD' ? [2, 1, b.numHeads, n, b.headSize] : [1, b.numHeads, n, b.headSize];
    feeds[b.pastKey] = emptyTensor(b.dtype, dims);
    if (b.pastValue) feeds[b.pastValue] = emptyTensor(b.dtype, dims);
    if (b.pastLength) feeds[b.pastLength] = typed('int64', [n], [1]);
    if (b.pastValid) feeds[b.pastValid] = new ort.Tensor('bool', new Uint8Array(n).fill(1), [1, n]);
    // A routed sliding-window layer: its cached tokens' original positions (the last n before the step).
    if (b.pastPositions)
      feeds[b.pastPositions] = typed(
        'int64',
        Array.from({ length: n }, (_, i) => past - n + i),
        [1, n],
      );
  }
  return feeds;
}

/**
 * Kernel events of the last run, attributed: a node named /model/layers.N/ is layer N's own; an
 * event inside the time window of layer N's If (modc/layerN/if_selected) is routing of layer N;
 * a node the original model has too (`originalNames`) is prefix/suffix; anything else was added
 * by the MoD passes before an If, and is charged to the next If in execution order.
 */
function summarize(events: ProfileEvent[], wallMs: number, timedRuns: number, originalNames: Set<string> | null): Summary {
  const runs = events.filter((e) => e.cat === 'Session' && e.name === 'model_run').slice(-timedRuns);
  const inTimedRun = (e: ProfileEvent) => runs.some((r) => e.ts >= r.ts && e.ts <= r.ts + r.dur);
  // Per-run averages: every duration is divided by the number of timed runs.
  const nodes = events.filter((e) => e.cat === 'Node' && e.name.endsWith('_kernel_time') && inTimedRun(e)).map((e) => ({ ...e, dur: e.dur / runs.length }));
  const s: Summary = {
    wallMs,
    plainWallMs: NaN,
    nodesPerRun: nodes.length / runs.length,
    kernelMs: 0,
    ifOverheadMs: 0,
    ifsPerRun: 0,
    largeWrites: { count: 0, mb: 0 },
    byOp: new Map(),
    byLayer: new Map(),
    outside: 0,
    names: new Set(),
  };
  const ifs = nodes
    .filter((e) => e.args?.op_name === 'If')
    .map((e) => ({ layer: Number(/modc\/layer(\d+)/.exec(e.name)?.[1] ?? -1), start: e.ts, end: e.ts + e.dur * runs.length, dur: e.dur / 1000, inner: 0 }));
  const layer = (l: number) => {
    const v = s.byLayer.get(l) ?? { layer: l, original: 0, routingInIf: 0, routingBefore: 0 };
    s.byLayer.set(l, v);
    return v;
  };
  for (const e of nodes) {
    const op = e.args?.op_name ?? '?';
    const name = e.name.replace(/_kernel_time$/, '');
    s.names.add(name);
    if (CONTROL_FLOW.has(op)) continue;
    const bytes = Number(e.args?.output_size ?? 0);
    if (bytes >= 1 << 20) {
      s.largeWrites.count += 1 / runs.length;
      s.largeWrites.mb += bytes / 1e6 / runs.length;
    }
    const t = e.dur / 1000;
    s.kernelMs += t;
    const o = s.byOp.get(op) ?? { ms: 0, count: 0 };
    o.ms += t;
    o.count++;
    s.byOp.set(op, o);
    const own = /^\/model\/layers\.(\d+)\//.exec(name);
    const inIf = ifs.find((w) => e.ts >= w.start && e.ts <= w.end);
    // Every If whose window holds the kernel (an outer one holds its nested Ifs' kernels too).
    for (const w of ifs) if (e.ts >= w.start && e.ts <= w.end) w.inner += t;
    if (own) layer(Number(own[1])).original += t;
    else if (inIf) layer(inIf.layer).routingInIf += t;
    else if (!originalNames || originalNames.has(name)) s.outside += t;
    else {
      const next = ifs.find((w) => w.start >= e.ts);
      if (next) layer(next.layer).routingBefore += t;
      else s.outside += t;
    }
  }
  // An If inside another's window is nested: its kernels are already in the outer one's.
  const outermost = ifs.filter((w) => !ifs.some((o) => o !== w && o.start <= w.start && o.end >= w.end && (o.start < w.start || o.end > w.end)));
  s.ifOverheadMs = outermost.reduce((a, w) => a + Math.max(0, w.dur - w.inner), 0);
  s.ifsPerRun = ifs.length / runs.length;
  return s;
}

async function timedRuns(session: ort.InferenceSession, feeds: Record<string, ort.Tensor>, warmup: number, runs: number): Promise<number> {
  const wall: number[] = [];
  for (let r = 0; r < warmup + runs; r++) {
    collectGarbage();
    const t0 = performance.now();
    await session.run(feeds);
    if (r >= warmup) wall.push(performance.now() - t0);
  }
  return median(wall);
}

async function profileOne(
  path: string,
  prefix: string,
  dir: string,
  feeds: Record<string, ort.Tensor>,
  warmup: number,
  runs: number,
  threads: number,
  originalNames: Set<string> | null,
  ep: 'cpu' | 'cuda' = 'cpu',
): Promise<Summary> {
  const plain = await ort.InferenceSession.create(path, {
    executionProviders: [ep],
    graphOptimizationLevel: 'all',
    ...(threads > 0 ? { intraOpNumThreads: threads } : {}),
  });
  const plainWallMs = await timedRuns(plain, feeds, warmup, runs);
  await plain.release();
  const session = await ort.InferenceSession.create(path, {
    executionProviders: [ep],
    graphOptimizationLevel: 'all',
    enableProfiling: true,
    profileFilePrefix: `${dir}/${prefix}`,
    ...(threads > 0 ? { intraOpNumThreads: threads } : {}),
  });
  const wallMs = await timedRuns(session, feeds, warmup, runs);
  session.endProfiling();
  await session.release();
  const file = readdirSync(dir).find((n) => n.startsWith(`${prefix}_`) && n.endsWith('.json'));
  if (!file) throw new Error(`no ORT profile written for ${prefix} in ${dir}`);
  return { ...summarize(JSON.parse(readFileSync(`${dir}/${file}`, 'utf8')) as ProfileEvent[], wallMs, runs, originalNames), plainWallMs };
}

export async function profileBench(argv: readonly string[]): Promise<void> {
  const f = applyQuick(parseFlags(argv, PROFILE_FLAGS), argv, {});
  if (f.mode !== 'prefill' && f.mode !== 'decode') throw new UsageError(`--mode must be prefill or decode, got '${f.mode}'`);
  const w = new Workdir(f.keep);
  try {
    const original = buildModel(w, f);
    const allPass = w.path('all-pass.onnx');
    compileModel(original, allPass, { routers: { kind: 'all-pass' }, gated: false });
    const mod = w.path('mod.onnx');
    const { plan } = compileModel(original, mod, {
      routers: { kind: 'random', seed: f['router-seed'] },
      mode: 'topk',
      capacity: f.capacity,
      schedule: 'every-other',
      gated: true,
    });
    const ids = f.mode === 'prefill' ? tokenIds(f.prompt, f.vocab, 1234) : tokenIds(1, f.vocab, 99);
    const past = f.mode === 'prefill' ? 0 : f.prompt;
    const models = [
      ['original', original, 1],
      ['all-pass', allPass, 1],
      ['mod', mod, f.capacity],
    ] as const;
    const summaries: [string, Summary][] = [];
    for (const [name, path, c] of models) {
      log(`profiling ${name}`);
      const originalNames = summaries[0]?.[1].names ?? null;
      summaries.push([
        name,
        await profileOne(
          path,
          name,
          w.dir,
          feedsFor(path, ids, past, c),
          f.warmup,
          Math.max(1, f.runs),
          f.threads,
          originalNames,
          sessionOptions(f).executionProvider,
        ),
      ]);
    }
    const routing = (s: Summary) => [...s.byLayer.values()].reduce((a, l) => a + l.routingInIf + l.routingBefore, 0);
    if (f.json) {
      console.log(
        JSON.stringify(
          {
            bench: 'profile',
            mode: f.mode,
            settings: {
              ...settingsJson(f, `npm run bench -- profile ${argv.join(' ')}`.trimEnd()),
              prompt: f.prompt,
              warmup: f.warmup,
              runs: Math.max(1, f.runs),
            },
            models: summaries.map(([n, s]) => ({
              model: n,
              wallMs: s.plainWallMs,
              profiledWallMs: s.wallMs,
              kernelEventsPerRun: s.nodesPerRun,
              ifsPerRun: s.ifsPerRun,
              largeWrites: s.largeWrites,
              kernelMs: s.kernelMs,
              ifOverheadMs: s.ifOverheadMs,
              outsideLayersMs: s.outside,
              routingMs: routing(s),
              byOp: Object.fromEntries(s.byOp),
              byLayer: [...s.byLayer.values()],
            })),
          },
          null,
          2,
        ),
      );
      return;
    }
    const out: string[] = [];
    out.push(`## ORT profile: ${f.mode === 'prefill' ? `${f.prompt}-token prefill` : `one decode step after ${f.prompt} tokens`}, batch 1`, '');
    out.push(
      '```',
      `command: npm run bench -- profile ${argv.join(' ')}`.trimEnd(),
      environment(f),
      modelLine(f),
      `mod: top-k capacity ${f.capacity}, every-other (layers ${plan.layers.map((l) => l.layer).join(', ')}), random routers seed ${f['router-seed']}, gated`,
      ...(f.mode === 'decode'
        ? [
            `decode feeds: zero past K/V of ${f.prompt} tokens (converted layers of the MoD compile: ceil(c x ${f.prompt})); whether a converted layer runs depends on its router`,
          ]
        : []),
      `per model: ${f.warmup} untimed + ${Math.max(1, f.runs)} timed runs with profiling off, then the same with enableProfiling on (wall: median; kernel times: per-run mean of the profiled runs); If nodes are not summed, their subgraph kernels are`,
      'caution: the profiler costs tens of microseconds per kernel event (compare the two wall columns), and part of it lands in the kernel times: the many small routing nodes are over-counted',
      '```',
      '',
    );
    out.push(
      table(
        [
          'model',
          'wall, profiling off (median)',
          'wall, profiling on (median)',
          'kernel events per run',
          'If nodes run',
          'kernels writing >= 1 MiB (MB)',
          'sum of kernel times',
          'layer ops',
          'routing (added nodes)',
          'If overhead',
          'outside layers (prefix, suffix)',
        ],
        summaries.map(([n, s]) => [
          n,
          ms(s.plainWallMs),
          ms(s.wallMs),
          s.nodesPerRun.toFixed(0),
          s.ifsPerRun.toFixed(0),
          `${s.largeWrites.count.toFixed(0)} (${s.largeWrites.mb.toFixed(1)})`,
          ms(s.kernelMs),
          ms([...s.byLayer.values()].reduce((a, l) => a + l.original, 0)),
          ms(routing(s)),
          ms(s.ifOverheadMs),
          ms(s.outside),
        ]),
      ),
      '',
    );
    const ops = new Map<string, number>();
    for (const [, s] of summaries) for (const [op, v] of s.byOp) ops.set(op, Math.max(ops.get(op) ?? 0, v.ms));
    const topOps = [...ops.entries()]
      .sort((a, b) => b[1] - a[1])
      .slice(0, f.top)
      .map(([op]) => op);
    out.push(`Kernel time by op type (top ${f.top}; ms (calls)):`, '');
    out.push(
      table(
        ['op', ...summaries.map(([n]) => n)],
        topOps.map((op) => [
          op,
          ...summaries.map(([, s]) => {
            const v = s.byOp.get(op);
            return v ? `${v.ms.toFixed(1)} (${v.count})` : '';
          }),
        ]),
      ),
      '',
    );
    out.push(
      'Kernel time by layer (ms). "routing before If": router, selection, index compaction (charged to the next If); "routing in If": the recomputed mask and positions, token gather/scatter, KV compaction:',
      '',
    );
    const layers = [...new Set(summaries.flatMap(([, s]) => [...s.byLayer.keys()]))].filter((l) => l >= 0).sort((a, b) => a - b);
    const compiledNames = summaries.slice(1).map(([n]) => n);
    out.push(
      table(
        ['layer', 'original', ...compiledNames.flatMap((n) => [`${n}: layer ops`, `${n}: routing before If`, `${n}: routing in If`])],
        layers.map((l) => [
          `layer ${l}`,
          (summaries[0]![1].byLayer.get(l)?.original ?? 0).toFixed(1),
          ...summaries.slice(1).flatMap(([, s]) => {
            const v = s.byLayer.get(l);
            return [(v?.original ?? 0).toFixed(1), (v?.routingBefore ?? 0).toFixed(1), (v?.routingInIf ?? 0).toFixed(1)];
          }),
        ]),
      ),
      '',
    );
    out.push(
      `Share of kernel time in routing: ${summaries
        .slice(1)
        .map(([n, s]) => `${n} ${pct(routing(s) / s.kernelMs)}`)
        .join(', ')}`,
    );
    console.log(out.join('\n'));
  } finally {
    w.dispose();
  }
}
