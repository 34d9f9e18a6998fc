/**
 * The `modc` command line. Parses arguments, calls the library, formats results; it does no
 * graph surgery itself. Exit codes: 0 success, 1 error (bad model, failed check), 2 usage.
 */
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { ModcError, UsageError } from '../errors.js';
import { COMMANDS, type Command } from './commands.js';

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
    '',
    'exit codes: 0 success, 1 error, 2 usage error',
  ].join('\n');
}

export function commandHelp(cmd: Command): string {
  const lines = [`usage: ${cmd.usage}`, '', cmd.summary];
  if (cmd.details) lines.push('', cmd.details);
  const opts = Object.entries(cmd.options);
  if (opts.length) {
    lines.push('', 'options:');
    const labels = opts.map(([name, o]) => `${o.short ? `-${o.short}, ` : '    '}--${name}${o.type === 'string' ? ` ${o.valueName ?? 'VALUE'}` : ''}`);
    const width = Math.max(...labels.map((l) => l.length));
    opts.forEach(([, o], i) => lines.push(`  ${labels[i]!.padEnd(width)}  ${o.help}`));
  }
  return lines.join('\n');
}

export interface Io {
  out: (text: string) => void;
  err: (text: string) => void;
}

const defaultIo: Io = {
  out: (t) => process.stdout.write(t.endsWith('\n') ? t : t + '\n'),
  err: (t) => process.stderr.write(t.endsWith('\n') ? t : t + '\n'),
};

export async function main(argv: string[], io: Io = defaultIo): Promise<number> {
  const debug = argv.includes('--debug');
  const args = argv.filter((a) => a !== '--debug');
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
    let parsed;
    try {
      const options = Object.fromEntries(Object.entries(cmd.options).map(([k, o]) => [k, { type: o.type, ...(o.short ? { short: o.short } : {}), ...(o.multiple ? { multiple: true } : {}) }])) as ParseArgsConfig['options'];
      parsed = parseArgs({ args: rest, options, allowPositionals: true, strict: true });
    } catch (e) {
      throw new UsageError(`${(e as Error).message.split('\n')[0]} (see 'modc ${cmd.name} --help')`);
    }
    return await cmd.run(parsed.positionals, parsed.values as Record<string, string | boolean | string[] | undefined>, io);
  } catch (e) {
    if (e instanceof ModcError) {
      io.err(`modc: ${e.message}`);
      if (debug && e.stack) io.err(e.stack);
      return e.exitCode;
    }
    if (debug) throw e;
    const err = e as NodeJS.ErrnoException;
    io.err(`modc: internal error: ${err.message ?? String(e)} (rerun with --debug for a stack trace, and please report it)`);
    return 1;
  }
}
