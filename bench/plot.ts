/**
 * `npm run bench -- plot FILE.json... --out fig.svg`: draws the figures from JSON the tools
 * printed: speedup and KV bytes vs capacity from `modc bench --json` reports (one per compiled
 * model, or several models in one), quality vs compute from `modc eval --json` results and the
 * quality bench's `--json` output. With both kinds, two files: OUT-capacity.svg and OUT-quality.svg.
 */
import { readFileSync } from 'node:fs';
import { UsageError, ModcError } from '../compiler/core/errors.js';
import { parseOptions, stringFlag } from '../compiler/cli/shared.js';
import { writeTextAtomic } from '../compiler/core/io/write-text.js';
import { capacityFigure, qualityFigure, renderSvg } from '../compiler/apps/plot/figures.js';
import { collectPoints } from '../compiler/apps/plot/sources.js';

export const PLOT_USAGE = `usage: node dist/bench/run.js plot FILE.json... --out FIG.svg

FILE.json: \`modc bench --json\` reports (speedup and KV bytes vs capacity), \`modc eval --json\`
results and \`bench quality --json\` output (quality vs compute). When both kinds are given,
FIG-capacity.svg and FIG-quality.svg are written.`;

export async function plotBench(argv: readonly string[]): Promise<void> {
  const { values, positionals: files } = parseOptions(
    argv,
    { out: { type: 'string', short: 'o', valueName: 'FIG.svg', help: 'the figure to write' } },
    {
      allowPositionals: true,
      help: '--help',
    },
  );
  const out = stringFlag(values, 'out');
  if (!out || !out.endsWith('.svg')) throw new UsageError('give --out FIG.svg');
  if (files.length === 0) throw new UsageError('give at least one JSON file');
  const sources = files.map((name) => {
    try {
      return { name, doc: JSON.parse(readFileSync(name, 'utf8')) as unknown };
    } catch (e) {
      throw new ModcError(`cannot read ${name}: ${(e as Error).message.split('\n')[0]}`);
    }
  });
  const { capacity, quality } = collectPoints(sources);
  const both = capacity.length > 0 && quality.length > 0;
  const name = (kind: string) => (both ? out.replace(/\.svg$/, `-${kind}.svg`) : out);
  if (capacity.length) writeTextAtomic(name('capacity'), await renderSvg(capacityFigure(capacity)));
  if (quality.length) writeTextAtomic(name('quality'), await renderSvg(qualityFigure(quality)));
  console.log(`wrote ${[capacity.length ? name('capacity') : null, quality.length ? name('quality') : null].filter(Boolean).join(', ')}`);
}
