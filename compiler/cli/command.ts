/** The shape of one `modc` subcommand: its options (node:util parseArgs form), help, and runner. */
import type { Io } from './main.js';

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
