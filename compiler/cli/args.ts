/** Small helpers for reading parsed CLI values with usage errors that name the flag. */
import { UsageError } from '../errors.js';
import type { CliValues } from './command.js';

export function onePositional(positionals: string[], what: string, command: string): string {
  if (positionals.length === 0) throw new UsageError(`missing ${what} (usage: see 'modc ${command} --help')`);
  if (positionals.length > 1) throw new UsageError(`expected one ${what}, got ${positionals.length}: ${positionals.join(' ')}`);
  return positionals[0]!;
}

export function stringFlag(values: CliValues, name: string): string | undefined {
  const v = values[name];
  return typeof v === 'string' ? v : undefined;
}

export function listFlag(values: CliValues, name: string): string[] {
  const v = values[name];
  if (v === undefined) return [];
  const items = Array.isArray(v) ? v : [String(v)];
  return items.flatMap((s) => s.split(',')).map((s) => s.trim()).filter(Boolean);
}

export function numberFlag(values: CliValues, name: string): number | undefined {
  const raw = stringFlag(values, name);
  if (raw === undefined) return undefined;
  const n = Number(raw);
  if (raw.trim() === '' || !Number.isFinite(n)) throw new UsageError(`--${name} must be a number, got '${raw}'`);
  return n;
}

/** An integer flag of at least `min`, or `fallback` when absent. */
export function intFlag(values: CliValues, name: string, fallback: number, min: number): number {
  const v = numberFlag(values, name) ?? fallback;
  if (!Number.isInteger(v) || v < min) throw new UsageError(`--${name} must be an integer >= ${min}`);
  return v;
}

/** The ORIGINAL.onnx COMPILED.onnx pair of verify and bench. */
export function modelPair(positionals: string[]): [original: string, compiled: string] {
  if (positionals.length !== 2) throw new UsageError('expected two model paths: ORIGINAL.onnx COMPILED.onnx');
  return positionals as [string, string];
}
