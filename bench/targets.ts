/**
 * Targets benchmark: the decode benchmark over every form, granularity and context the speed
 * targets name, one fresh child process per combination (`node dist/bench/run.js decode ...
 * --json`), gathered into one table with each target and whether it held:
 *
 *   all-pass per-step ratio   <= 1.05 at batch 1, <= 1.10 at batch > 1 (every layer's part, ungated)
 *   routed achieved / ideal   >= 0.9 (random routers, top-k 0.5, about half the decode tokens)
 *
 * A combination the decode benchmark cannot run is a row that says why; the others still run.
 */
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { ModcError, UsageError } from '../compiler/core/errors.js';
import { FORMS, GRANULARITIES, flagHelp, givenFlags, log, modelFlags, ms, parseFlags, ratio, table, type FlagSpecs } from './common.js';

/** Model-size flags the targets benchmark hands on to every decode run when given (the decode benchmark's own). */
const SIZE_FLAGS = ['hidden', 'layers', 'heads', 'kv-heads', 'intermediate', 'vocab'] as const;
const MODEL_FLAGS = modelFlags({ prompt: 512, runs: 64, warmup: 3 });

export const TARGETS_FLAGS = {
  forms: { kind: 'string', default: FORMS.join(','), help: 'decoder forms, comma-separated' },
  granularities: { kind: 'string', default: GRANULARITIES.join(','), help: 'what a converted layer routes, comma-separated' },
  prompts: { kind: 'string', default: '512,2047', help: 'prompt lengths (context = prompt + 1), comma-separated' },
  'batch-prompt': {
    kind: 'int',
    default: 511,
    help: 'prompt of the batched row (the llama form, block granularity, --batch rows; its all-pass target is 1.10x); 0 skips it',
  },
  batch: { kind: 'int', default: 4, help: 'rows of the batched row', min: 2 },
  runs: { kind: 'int', default: 64, help: 'timed decode steps per pair and process', min: 1 },
  warmup: { kind: 'int', default: 3, help: 'untimed decode steps after the prefill' },
  processes: { kind: 'int', default: 6, help: 'fresh processes each pair is timed in (samples pooled)', min: 1 },
  threads: { kind: 'int', default: 1, help: 'ORT intra-op threads', min: 1 },
  routed: { kind: 'bool', default: true, help: 'time the routed compile too (achieved / ideal); --no-routed times the all-pass compile only' },
  hidden: MODEL_FLAGS.hidden,
  layers: MODEL_FLAGS.layers,
  heads: MODEL_FLAGS.heads,
  'kv-heads': MODEL_FLAGS['kv-heads'],
  intermediate: MODEL_FLAGS.intermediate,
  vocab: MODEL_FLAGS.vocab,
  json: { kind: 'bool', default: false, help: 'print the rows as one JSON object on stdout' },
  'default-malloc': { kind: 'bool', default: false, help: 'keep glibc malloc defaults (see run.js --help)' },
  quick: {
    kind: 'bool',
    default: false,
    help: "a smoke run: the decode benchmark's small sizes, prompts 128, 2 steps, 1 process (flags given explicitly keep their value)",
  },
} satisfies FlagSpecs;

export const TARGETS_USAGE = `node dist/bench/run.js targets [flags]   (npm run bench -- targets [flags])

Runs the decode benchmark once per combination of --forms, --granularities and --prompts at
batch 1, plus one batched row (llama form, block, --batch rows at --batch-prompt), each in its
own child process (\`decode ... --json\`, with --runs, --warmup, --processes and --threads), and
prints one table: the all-pass compile's median per-step ratio against the original (target
<= 1.05x at batch 1, <= 1.10x batched) and the routed compile's achieved / ideal (target >= 0.9),
with the decode benchmark's own verdicts.
The full matrix is 5 forms x 3 granularities x 2 prompts + 1 = 31 decode runs, two to three
minutes each at 512 on a 2-core machine with the defaults (more at 2047); the list flags narrow
it. A combination that cannot run is a row saying why, and the exit code is then 1.

${flagHelp(TARGETS_FLAGS)}`;

export interface TargetRow {
  form: string;
  granularity: string;
  prompt: number;
  batch: number;
  /** The decode command this row ran. */
  command: string;
  /** Why the decode benchmark failed, when it did (the other fields are then null). */
  error: string | null;
  originalStepMs: number | null;
  allPass: { ratio: number; target: number; met: boolean } | null;
  routed: { ratio: number; achievedOverIdeal: number; target: number; met: boolean } | null;
}

function list(value: string, flag: string, allowed?: readonly string[]): string[] {
  const items = value
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
  if (items.length === 0) throw new UsageError(`--${flag} needs at least one value`);
  for (const it of items) if (allowed && !allowed.includes(it)) throw new UsageError(`--${flag}: '${it}' is not one of ${allowed.join(', ')}`);
  return items;
}

function prompts(value: string): number[] {
  return list(value, 'prompts').map((s) => {
    const n = Number(s);
    if (!Number.isInteger(n) || n < 1) throw new UsageError(`--prompts: '${s}' is not a positive integer`);
    return n;
  });
}

interface DecodeReport {
  pairs: { model: string; perStepRatio: { wall: { medianOfPaired: number } }; original: { step: { median: number } } }[];
  targets: {
    allPassPerStepRatio: { value: number; target: number; met: boolean };
    routedAchievedOverIdeal: { value: number; target: number; met: boolean } | null;
  };
}

/**
 * One decode run in a child process; its report, or why it failed (the child's last `bench: ...`
 * or `...Error: ...` line on stderr). The child's progress goes on to stderr as it comes.
 */
async function runDecode(args: string[]): Promise<DecodeReport | string> {
  const script = fileURLToPath(new URL('./run.js', import.meta.url));
  const child = spawn(process.execPath, [script, 'decode', ...args, '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let reason = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => {
    process.stderr.write(d);
    // A benchmark's own error is one `bench: ...` line; a crash ends with an `...Error: ...` line and a stack.
    for (const l of d.split('\n')) if (/^bench: |^\w*Error\b/.test(l.trim())) reason = l.trim();
  });
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  if (code !== 0) return reason.replace(/^bench: /, '') || `decode exited with ${code}`;
  try {
    return JSON.parse(stdout) as DecodeReport;
  } catch {
    return 'decode printed no JSON report';
  }
}

export async function targetsBench(argv: readonly string[]): Promise<void> {
  const given = givenFlags(argv);
  const parsed = parseFlags(argv, TARGETS_FLAGS);
  const quick = { prompts: '128', 'batch-prompt': 128, runs: 2, warmup: 1, processes: 1 };
  const f = parsed.quick ? { ...parsed, ...Object.fromEntries(Object.entries(quick).filter(([k]) => !given.has(k))) } : parsed;
  const forms = list(f.forms, 'forms', FORMS);
  const granularities = list(f.granularities, 'granularities', GRANULARITIES);
  const contexts = prompts(f.prompts);
  const common = [
    ...['runs', 'warmup', 'processes', 'threads'].flatMap((k) => [`--${k}`, String(f[k as keyof typeof f])]),
    ...SIZE_FLAGS.filter((k) => given.has(k)).flatMap((k) => [`--${k}`, String(f[k])]),
    ...(f.routed ? [] : ['--no-routed']),
    ...(f['default-malloc'] ? ['--default-malloc'] : []),
    ...(f.quick ? ['--quick'] : []),
  ];
  const combos: { form: string; granularity: string; prompt: number; batch: number }[] = [];
  for (const form of forms) for (const granularity of granularities) for (const prompt of contexts) combos.push({ form, granularity, prompt, batch: 1 });
  if (f['batch-prompt'] > 0) combos.push({ form: 'llama', granularity: 'block', prompt: f['batch-prompt'], batch: f.batch });

  const rows: TargetRow[] = [];
  for (const [i, c] of combos.entries()) {
    const args = [
      '--form',
      c.form,
      '--granularity',
      c.granularity,
      '--prompt',
      String(c.prompt),
      ...(c.batch > 1 ? ['--batch', String(c.batch)] : []),
      ...common,
    ];
    const command = `npm run bench -- decode ${args.join(' ')}`;
    log(`targets ${i + 1}/${combos.length}: ${c.form}, ${c.granularity}, prompt ${c.prompt}, batch ${c.batch}`);
    const report = await runDecode(args);
    const row: TargetRow = { ...c, command, error: null, originalStepMs: null, allPass: null, routed: null };
    if (typeof report === 'string') row.error = report;
    else {
      const pair = (name: string) => report.pairs.find((p) => p.model === name);
      const allPass = pair('all-pass');
      const routed = pair('routed');
      row.originalStepMs = (allPass ?? routed)?.original.step.median ?? null;
      // The decode benchmark's own verdicts: 1.05x at batch 1, 1.10x batched; 0.9 of the ideal.
      const t = report.targets;
      if (allPass) row.allPass = { ratio: t.allPassPerStepRatio.value, target: t.allPassPerStepRatio.target, met: t.allPassPerStepRatio.met };
      if (routed && t.routedAchievedOverIdeal)
        row.routed = {
          ratio: routed.perStepRatio.wall.medianOfPaired,
          achievedOverIdeal: t.routedAchievedOverIdeal.value,
          target: t.routedAchievedOverIdeal.target,
          met: t.routedAchievedOverIdeal.met,
        };
    }
    rows.push(row);
  }

  const checks = rows.flatMap((r) => [r.allPass?.met, r.routed?.met]).filter((m): m is boolean => m !== undefined);
  const met = checks.filter(Boolean).length;
  const failed = rows.filter((r) => r.error).length;
  const command = `npm run bench -- targets ${argv.join(' ')}`.trimEnd();
  if (f.json) {
    console.log(JSON.stringify({ bench: 'targets', command, date: new Date().toISOString(), rows, met, checks: checks.length, failed }, null, 2));
  } else printTable(rows, combos.length, command, common, met, checks.length, failed);
  // A target not met is a measurement; a combination that did not run is an error (exit code 1).
  if (failed) throw new ModcError(`${failed} of ${combos.length} combinations failed to run; their rows say why`);
}

function printTable(rows: TargetRow[], combos: number, command: string, common: string[], met: number, checks: number, failed: number): void {
  const yesNo = (ok: boolean) => (ok ? 'yes' : '**no**');
  console.log(`## Speed targets: decode, ${combos} combinations\n`);
  const fence = '```';
  console.log(
    [
      fence,
      `command: ${command}`,
      `date: ${new Date().toISOString()}`,
      `each row: npm run bench -- decode --form F --granularity G --prompt P [--batch B] ${common.join(' ')} --json`,
      fence,
      '',
    ].join('\n'),
  );
  console.log(
    table(
      [
        'form',
        'prompt',
        'batch',
        'granularity',
        'original median step',
        'all-pass per-step ratio',
        'target',
        'met',
        'routed per-step ratio',
        'routed achieved / ideal',
        'target',
        'met',
      ],
      rows.map((r) =>
        r.error
          ? [r.form, r.prompt, r.batch, r.granularity, `failed: ${r.error}`, '', '', '', '', '', '', '']
          : [
              r.form,
              r.prompt,
              r.batch,
              r.granularity,
              r.originalStepMs === null ? '' : ms(r.originalStepMs, 2),
              r.allPass ? ratio(r.allPass.ratio) : '',
              r.allPass ? `<= ${r.allPass.target.toFixed(2)}x` : '',
              r.allPass ? yesNo(r.allPass.met) : '',
              r.routed ? ratio(r.routed.ratio) : '',
              r.routed ? r.routed.achievedOverIdeal.toFixed(3) : '',
              r.routed ? `>= ${r.routed.target}` : '',
              r.routed ? yesNo(r.routed.met) : '',
            ],
      ),
    ),
  );
  console.log(`\nTargets met: ${met} of ${checks}${failed ? `; ${failed} combination${failed === 1 ? '' : 's'} failed to run` : ''}.`);
}
