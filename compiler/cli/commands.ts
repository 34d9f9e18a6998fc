/** The subcommands, in the order `modc --help` lists them. */
import type { Command } from './command.js';
import { compileCommand } from './compile.js';
import { inspectCommand } from './inspect.js';
import { runCommand } from './run.js';
import { generateCommand } from './generate.js';
import { verifyCommand } from './verify.js';
import { benchCommand } from './bench.js';
import { evalCommand } from './eval.js';
import { calibrateCommand } from './calibrate.js';
import { codegenCommand } from './codegen.js';

export type { Command } from './command.js';

export const COMMANDS: Command[] = [inspectCommand, compileCommand, runCommand, generateCommand, verifyCommand, benchCommand, calibrateCommand, evalCommand, codegenCommand];
