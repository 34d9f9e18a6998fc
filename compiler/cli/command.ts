/** The shape of one `modc` subcommand (its options in node:util parseArgs form, help and runner) and what it talks to. */

export interface CliOption {
  type: 'string' | 'boolean';
  short?: string;
  multiple?: boolean;
  valueName?: string;
  help: string;
}

export type CliValues = Record<string, string | boolean | string[] | undefined>;

export interface Command {
  name: string;
  summary: string;
  usage: string;
  details?: string;
  options: Record<string, CliOption>;
  run(positionals: string[], values: CliValues, io: Io): Promise<number>;
}

/** Progress on stderr for long work: see progress.ts for where it draws. */
export interface Progress {
  /** Starts a stage (ending the one before): a bar of `total` units, or with no total one line. */
  stage(label: string, total?: number): void;
  /** `n` (default 1) more units of the current stage are done. */
  tick(n?: number): void;
  /** Ends the current stage; a TTY bar is cleared. Safe to call more than once. */
  stop(): void;
}

/** Where a command writes: stdout for results, stderr for status and errors. */
export interface Io {
  out: (text: string) => void;
  err: (text: string) => void;
  /** The real stderr, when `err` writes to it: progress bars draw on it if it is a TTY. */
  errStream?: NodeJS.WritableStream & { isTTY?: boolean };
  /** Set by main() for the command it runs; read it with progressOf(io). */
  progress?: Progress;
}

/** A reporter that shows nothing. */
export const SILENT_PROGRESS: Progress = { stage() {}, tick() {}, stop() {} };
