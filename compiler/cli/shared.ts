/**
 * What the commands share: reading option values (usage errors name the flag), token-id rows,
 * text formatting, the options and JSON shapes several commands have, and the progress reporter.
 * Commands import this module and command.ts, never each other.
 */
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { UsageError } from '../core/errors.js';
import type { ModelSummary, TensorSignature } from '../core/ir/model-summary.js';
import type { ExecutionProvider } from '../runtime/ort.js';
import { SILENT_PROGRESS, type CliOption, type CliValues, type Io, type Progress } from './command.js';

// --- parsing ------------------------------------------------------------------------------------

/**
 * `--seed -1` as `--seed=-1`: node:util's parseArgs refuses a value that starts with a dash
 * ("argument is ambiguous"). A negative number after a flag that takes a value is that value;
 * each command then accepts or refuses it by its own range check.
 */
export function attachNegativeValues(args: readonly string[], options: Record<string, CliOption>): string[] {
  const out: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    const next = args[i + 1];
    const long = /^--([^=]+)$/.exec(a)?.[1];
    const name = long ?? Object.entries(options).find(([, o]) => o.short !== undefined && a === `-${o.short}`)?.[0];
    if (
      name !== undefined &&
      options[name]?.type === 'string' &&
      next !== undefined &&
      /^-(\d|\.\d|Infinity)/.test(next) &&
      args.slice(0, i).indexOf('--') < 0
    ) {
      out.push(`--${name}=${next}`);
      i++;
    } else {
      out.push(a);
    }
  }
  return out;
}

/**
 * node:util parseArgs over `options` (strict: an unknown flag or a missing value is a usage
 * error naming `help`). `allowNegative` takes `--no-NAME` for a boolean NAME as false.
 */
export function parseOptions(
  args: readonly string[],
  options: Record<string, CliOption>,
  opts: { allowPositionals: boolean; allowNegative?: boolean; help: string },
): { values: CliValues; positionals: string[] } {
  const config = Object.fromEntries(
    Object.entries(options).map(([k, o]) => [k, { type: o.type, ...(o.short ? { short: o.short } : {}), ...(o.multiple ? { multiple: true } : {}) }]),
  ) as ParseArgsConfig['options'];
  try {
    const parsed = parseArgs({
      args: attachNegativeValues(args, options),
      options: config,
      allowPositionals: opts.allowPositionals,
      allowNegative: opts.allowNegative ?? false,
      strict: true,
    });
    return { values: parsed.values as CliValues, positionals: parsed.positionals };
  } catch (e) {
    throw new UsageError(`${(e as Error).message.split('\n')[0]} (see ${opts.help})`);
  }
}

// --- option values -----------------------------------------------------------------------------

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
  return items
    .flatMap((s) => s.split(','))
    .map((s) => s.trim())
    .filter(Boolean);
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

/** A string flag that must be one of `allowed`; undefined when absent. */
export function oneOf<T extends string>(values: CliValues, flag: string, allowed: readonly T[]): T | undefined {
  const v = stringFlag(values, flag);
  if (v === undefined) return undefined;
  if (!allowed.includes(v as T)) throw new UsageError(`--${flag} must be one of ${allowed.join(', ')}, got '${v}'`);
  return v as T;
}

// --- token ids ----------------------------------------------------------------------------------

export function parseIdRows(text: string, flag = '--ids'): number[][] {
  const rows = text.split(';').map((r) => r.trim());
  if (rows.length === 0 || rows.some((r) => r === '')) throw new UsageError(`${flag}: every row needs at least one id (rows are separated by ';', ids by ',')`);
  return rows.map((r) => parseIdList(r, flag));
}

export function parseIdList(text: string, flag: string): number[] {
  return text.split(',').map((s) => {
    const t = s.trim();
    if (!/^\d+$/.test(t)) throw new UsageError(`${flag}: '${t}' is not a token id (non-negative integer)`);
    return Number(t);
  });
}

// --- options and JSON shared by several commands -------------------------------------------------

export function executionProvider(values: Record<string, unknown>): ExecutionProvider {
  const ep = (values.ep as string | undefined) ?? 'cpu';
  if (ep !== 'cpu' && ep !== 'cuda') throw new UsageError(`--ep must be cpu or cuda, got '${ep}'`);
  return ep;
}

/** The --pad flag; undefined when absent (the model's default side: left, or right for GroupQueryAttention). */
export function padSide(values: Record<string, unknown>): 'left' | 'right' | undefined {
  const pad = values.pad as string | undefined;
  if (pad === undefined) return undefined;
  if (pad !== 'left' && pad !== 'right') throw new UsageError(`--pad must be left or right, got '${pad}'`);
  return pad;
}

/** Options `run` and `generate` share. */
export const PROMPT_OPTIONS = {
  ids: { type: 'string', valueName: 'IDS', help: 'token ids: rows separated by ";", ids by ","' },
  pad: {
    type: 'string',
    valueName: 'SIDE',
    help: 'pad shorter rows on the left or right (default left; right, the only side it takes, for GroupQueryAttention)',
  },
  ep: { type: 'string', valueName: 'EP', help: 'execution provider: cpu (default) or cuda' },
  embeds: {
    type: 'string',
    valueName: 'FILE',
    help: 'inputs_embeds decoders: the prompt as a [B, S, H] .npy/.safetensors tensor, or "random" (seeded embeddings of --ids); default: the embedding model genai_config.json names',
  },
  json: { type: 'boolean', help: 'print the result as JSON' },
} as const satisfies Record<string, CliOption>;

/** float32 values read from a router file, shown without their float noise. */
export const short = (v: number) => Number(v.toPrecision(6));

/** A routed layer as --json reports it: its threshold in threshold mode, its capacity in top-k mode. */
export function routedLayerJson<T extends { threshold: number; capacity: number }>(
  mode: 'threshold' | 'topk',
  layer: T,
): Omit<T, 'threshold' | 'capacity'> & ({ threshold: number } | { capacity: number }) {
  const { threshold, capacity, ...rest } = layer;
  return mode === 'threshold' ? { ...rest, threshold } : { ...rest, capacity };
}

// --- progress -----------------------------------------------------------------------------------

/** The command's progress reporter (silent when main() did not make one, e.g. a library call). */
export function progressOf(io: Io): Progress {
  return io.progress ?? SILENT_PROGRESS;
}

// --- text ---------------------------------------------------------------------------------------

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${n} B` : `${v.toFixed(v >= 100 ? 0 : v >= 10 ? 1 : 2)} ${units[u]}`;
}

export function formatCount(n: number): string {
  return n.toLocaleString('en-US');
}

function formatShape(s: TensorSignature['shape']): string {
  return s ? `[${s.map((d) => (d === null ? '?' : d)).join(', ')}]` : '[?]';
}

export function table(rows: string[][], indent = '  '): string[] {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
  return rows.map(
    (r) =>
      indent +
      r
        .map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!)))
        .join('  ')
        .trimEnd(),
  );
}

export function formatSummary(s: ModelSummary): string {
  const lines: string[] = [];
  lines.push(`model      ${s.path ?? '<memory>'}`);
  lines.push(`ir         ${s.irVersion}    opsets: ${s.opsets.map((o) => `${o.domain || 'ai.onnx'} ${o.version}`).join(', ')}`);
  lines.push(`producer   ${[s.producer.name, s.producer.version].filter(Boolean).join(' ') || '(none)'}`);
  lines.push(`inputs     ${s.inputs.length}`);
  lines.push(
    ...table(
      s.inputs.map((v) => [v.name, v.dtype, formatShape(v.shape)]),
      '  ',
    ),
  );
  lines.push(`outputs    ${s.outputs.length}`);
  lines.push(
    ...table(
      s.outputs.map((v) => [v.name, v.dtype, formatShape(v.shape)]),
      '  ',
    ),
  );
  lines.push(`nodes      ${formatCount(s.nodes)}`);
  for (const [domain, ops] of Object.entries(s.ops).sort(([a], [b]) => a.localeCompare(b))) {
    const hist = Object.entries(ops)
      .sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]))
      .map(([op, n]) => `${op} ${n}`);
    lines.push(`  ${(domain || 'ai.onnx').padEnd(14)} ${hist.join(', ')}`);
  }
  if (s.functions.length) lines.push(`functions  ${s.functions.join(', ')}`);
  const p = s.parameters;
  lines.push(
    `params     ${formatCount(p.elements)} in ${p.tensors} tensors, ${formatBytes(p.bytes)} (inline ${formatBytes(p.internalBytes)}, external ${formatBytes(p.externalBytes)}${p.externalFiles.length ? ` in ${p.externalFiles.join(', ')}` : ''})`,
  );
  return lines.join('\n');
}
