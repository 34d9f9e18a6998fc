/** Figures: SVG drawn server-side by Vega from the JSON the tools print, holding every plotted point. */
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { plotBench } from '../bench/plot.js';
import { ModcError } from '../compiler/core/errors.js';
import { capacityFigure, qualityFigure, renderSvg, type CapacityPoint } from '../compiler/apps/plot/figures.js';
import { collectPoints } from '../compiler/apps/plot/sources.js';
import { fixture, runCli, tempDir } from './helpers.js';

const dir = tempDir('modc-plot');

/** The data marks of an SVG, from Vega's aria labels: `field: value` pairs per point. */
function points(svg: string): Record<string, string>[] {
  return [...svg.matchAll(/aria-label="([^"]*series: [^"]*)"/g)].map((m) =>
    Object.fromEntries(m[1]!.split('; ').map((kv) => kv.split(': ') as [string, string])),
  );
}
const axisX = 'capacity (fraction of tokens a routed layer runs)';

describe('figures', () => {
  it('speedup and KV bytes vs capacity: one point per model and series, in an SVG document', async () => {
    const pts: CapacityPoint[] = [
      { capacity: 1, label: 'original', prefillSpeedup: 1, decodeSpeedup: 1, kvRatio: 1 },
      { capacity: 0.5, label: 'c05', prefillSpeedup: 1.25, decodeSpeedup: 1.125, kvRatio: 0.75 },
      { capacity: 0.25, label: 'c025', prefillSpeedup: 1.5, decodeSpeedup: 1.375, kvRatio: 0.625 },
    ];
    const svg = await renderSvg(capacityFigure(pts));
    expect(svg.startsWith('<svg')).toBe(true);
    expect(svg.trimEnd().endsWith('</svg>')).toBe(true);
    const marks = points(svg);
    for (const p of pts) {
      for (const [series, key, v] of [
        ['prefill', 'speedup', p.prefillSpeedup],
        ['decode', 'speedup', p.decodeSpeedup],
        ['KV bytes', 'KV bytes ratio', p.kvRatio],
      ] as const) {
        expect(
          marks.some((m) => m.series === series && Number(m[axisX]) === p.capacity && Number(m[key]) === v),
          `${series} at ${p.capacity}`,
        ).toBe(true);
      }
    }
    expect(svg).toMatch(/legend[^"]*2 values: decode, prefill/);
  });

  it('quality vs compute: every point of every series', async () => {
    const pts = [
      { series: 'dense', computeFraction: 1, nll: 3.5 },
      { series: 'calibrated', computeFraction: 0.75, nll: 3.625 },
      { series: 'random', computeFraction: 0.75, nll: 4.25 },
    ];
    const marks = points(await renderSvg(qualityFigure(pts)));
    for (const p of pts)
      expect(
        marks.some(
          (m) =>
            m.series === p.series && Number(m['held-out NLL (nats/token)']) === p.nll && Number(m['compute (fraction of dense MACs)']) === p.computeFraction,
        ),
      ).toBe(true);
  });

  it('points from eval results and quality-bench rows; an unknown document is refused', () => {
    const { quality, capacity } = collectPoints([
      { name: 'a.json', doc: { nll: 3.9, computeFraction: 0.6, routing: { mode: 'topk' } } },
      {
        name: 'q.json',
        doc: {
          denseNll: 3.5,
          rows: [
            { method: 'dense', granularity: 'dense', computeFraction: 1, nll: 3.5 },
            { method: 'calibrated', granularity: 'block', computeFraction: 0.8, nll: 3.7 },
          ],
        },
      },
    ]);
    expect(capacity).toEqual([]);
    expect(quality).toEqual([
      { series: 'dense', computeFraction: 1, nll: 3.5 },
      { series: 'calibrated, block', computeFraction: 0.8, nll: 3.7 },
      { series: 'modc eval', computeFraction: 0.6, nll: 3.9 },
    ]);
    expect(() => collectPoints([{ name: 'x.json', doc: { hello: 1 } }])).toThrow(ModcError);
  });
});

describe('modc bench --plot and bench plot', () => {
  it("modc bench --plot draws the measured ratios at the compiled model's capacity", async () => {
    const compiled = join(dir, 'c.onnx');
    expect(
      (await runCli('compile', fixture('llama-tiny'), '-o', compiled, '--router-init', 'random', '--routing', 'topk', '--capacity', '0.5', '-q')).code,
    ).toBe(0);
    const svgPath = join(dir, 'bench.svg');
    const res = await runCli(
      'bench',
      fixture('llama-tiny'),
      compiled,
      '--prompt',
      '8',
      '--steps',
      '2',
      '--runs',
      '1',
      '--warmup',
      '0',
      '--json',
      '--plot',
      svgPath,
    );
    expect(res.code, res.stderr).toBe(0);
    writeFileSync(join(dir, 'bench.json'), res.stdout);
    const report = JSON.parse(res.stdout);
    const marks = points(readFileSync(svgPath, 'utf8'));
    const kv = marks.find((m) => m.series === 'KV bytes' && Number(m[axisX]) === 0.5);
    expect(Number(kv?.['KV bytes ratio'])).toBeCloseTo(report.ratios[0].kvBytes, 9);
    const prefill = marks.find((m) => m.series === 'prefill' && Number(m[axisX]) === 0.5);
    expect(Number(prefill?.speedup)).toBeCloseTo(1 / report.ratios[0].prefill.medianOfPaired, 9);
    expect(marks.some((m) => m.series === 'decode' && Number(m[axisX]) === 1 && m.speedup === '1')).toBe(true);
  });

  it('bench plot draws both figures from bench and eval JSON files', async () => {
    writeFileSync(join(dir, 'eval.json'), JSON.stringify({ nll: 4.5, computeFraction: 0.7, routing: null }));
    await plotBench([join(dir, 'bench.json'), join(dir, 'eval.json'), '--out', join(dir, 'fig.svg')]);
    expect(points(readFileSync(join(dir, 'fig-capacity.svg'), 'utf8')).some((m) => m.series === 'KV bytes' && Number(m[axisX]) === 0.5)).toBe(true);
    expect(points(readFileSync(join(dir, 'fig-quality.svg'), 'utf8')).some((m) => m.series === 'modc eval' && m['held-out NLL (nats/token)'] === '4.5')).toBe(
      true,
    );
    expect(existsSync(join(dir, 'fig.svg'))).toBe(false);
  });
});
