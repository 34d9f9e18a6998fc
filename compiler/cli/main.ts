/**
 * The `modc` command line. Parses arguments, calls the library, formats results; it does no
 * graph surgery itself. Exit codes: 0 success, 1 error (bad model, failed check), 2 usage.
 */
import { rerunWithMallocEnv } from '../apps/benchmark/benchmark.js';
import { ModcError, UsageError } from '../core/errors.js';
import type { CliOption, CliValues, Command, Io, Progress } from './command.js';
import { benchCommand } from './commands/bench-command.js';
import { calibrateCommand } from './commands/calibrate-command.js';
import { codegenCommand } from './commands/codegen-command.js';
import { compileCommand } from './commands/compile-command.js';
import { evalCommand } from './commands/eval-command.js';
import { generateCommand } from './commands/generate-command.js';
import { inspectCommand } from './commands/inspect-command.js';
import { runCommand } from './commands/run-command.js';
import { verifyCommand } from './commands/verify-command.js';
import { createProgress, PROGRESS_OPTIONS, progressMode } from './progress.js';
import { parseOptions } from './shared.js';

export type { Io } from './command.js';
export { attachNegativeValues } from './shared.js';

/**
 * `modc bench` under the benchmarks' glibc malloc settings: runs `script` (the modc entry point)
 * again with MALLOC_ENV set and returns its exit code; null for every other command, off Linux,
 * with --default-malloc, or when the settings are already there.
 */
export function relaunchForBench(script: string, argv: readonly string[]): number | null {
  const args = argv.filter((a) => a !== '--debug');
  if (args[0] !== 'bench' || args.includes('-h') || args.includes('--help')) return null;
  return rerunWithMallocEnv(script, argv);
}

/** The subcommands, in the order `modc --help` lists them. */
const COMMANDS: Command[] = [
  inspectCommand,
  compileCommand,
  runCommand,
  generateCommand,
  verifyCommand,
  benchCommand,
  calibrateCommand,
  evalCommand,
  codegenCommand,
];

export const VERSION = '0.1.0';

function globalHelp(): string {
  const width = Math.max(...COMMANDS.map((c) => c.name.length));
  return [
    'modc: compile decoder-only LLMs in ONNX into Mixture-of-Depths models',
    '',
    'usage: modc <command> [options]',
    '',
    'commands:',
    ...COMMANDS.map((c) => `  ${c.name.padEnd(width)}  ${c.summary}`),
    '',
    'global options:',
    '  -h, --help     show help (also `modc <command> --help`)',
    '  --version      print the version',
    '  --debug        show stack traces for errors',
    '  --progress     progress on stderr even when it is not a terminal (one line per stage)',
    '  -q, --quiet    no progress or status lines on stderr (errors still print)',
    '',
    'progress bars draw only when stderr is a terminal; a failing command prints its error as',
    'the last stderr line, `modc: ...`',
    '',
    'exit codes: 0 success, 1 error, 2 usage error',
  ].join('\n');
}

export function commandHelp(cmd: Command): string {
  const lines = [`usage: ${cmd.usage}`, '', cmd.summary];
  if (cmd.details) lines.push('', cmd.details);
  const own = Object.entries(cmd.options);
  const common = Object.entries(PROGRESS_OPTIONS).filter(([name]) => !(name in cmd.options));
  const label = ([name, o]: [string, CliOption]) => `${o.short ? `-${o.short}, ` : '    '}--${name}${o.type === 'string' ? ` ${o.valueName ?? 'VALUE'}` : ''}`;
  const width = Math.max(...[...own, ...common].map((e) => label(e).length));
  for (const [title, opts] of [
    ['options:', own],
    ['common options:', common],
  ] as const) {
    if (!opts.length) continue;
    lines.push('', title);
    for (const e of opts) lines.push(`  ${label(e).padEnd(width)}  ${e[1].help}`);
  }
  return lines.join('\n');
}

const defaultIo: Io = {
  out: (t) => process.stdout.write(t.endsWith('\n') ? t : t + '\n'),
  err: (t) => process.stderr.write(t.endsWith('\n') ? t : t + '\n'),
  errStream: process.stderr,
};

export async function main(argv: string[], io: Io = defaultIo): Promise<number> {
  const debug = argv.includes('--debug');
  const args = argv.filter((a) => a !== '--debug');
  let progress: Progress | undefined;
  try {
    const [name, ...rest] = args;
    if (name === undefined || name === '-h' || name === '--help' || name === 'help') {
      io.out(globalHelp());
      return name === undefined ? 2 : 0;
    }
    if (name === '--version') {
      io.out(VERSION);
      return 0;
    }
    const cmd = COMMANDS.find((c) => c.name === name);
    if (!cmd) throw new UsageError(`unknown command '${name}' (commands: ${COMMANDS.map((c) => c.name).join(', ')})`);
    if (rest.includes('-h') || rest.includes('--help')) {
      io.out(commandHelp(cmd));
      return 0;
    }
    const parsed = parseOptions(rest, { ...PROGRESS_OPTIONS, ...cmd.options }, { allowPositionals: true, help: `'modc ${cmd.name} --help'` });
    const values = parsed.values as CliValues;
    progress = createProgress(progressMode(values, io.errStream?.isTTY === true), io, io.errStream);
    return await cmd.run(parsed.positionals, values, { ...io, progress });
  } catch (e) {
    progress?.stop();
    if (e instanceof ModcError) {
      io.err(`modc: ${e.message}`);
      if (debug && e.stack) io.err(e.stack);
      return e.exitCode;
    }
    if (debug) throw e;
    const err = e as NodeJS.ErrnoException;
    io.err(`modc: internal error: ${err.message ?? String(e)} (rerun with --debug for a stack trace, and please report it)`);
    return 1;
  } finally {
    progress?.stop();
  }
}
