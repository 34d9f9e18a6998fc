/**
 * Child process of the bounded-memory test: calibrates MODEL on DATA with whatever heap limit the
 * parent gave node, sampling memory at every progress step, and prints the peaks as JSON.
 *   node --max-old-space-size=N --expose-gc --import tsx test/calibrate-memory-child.ts MODEL DATA OUT
 */
import { calibrate } from '../compiler/apps/calibration/calibrate.js';
import { readDataset } from '../compiler/apps/data/index.js';
import { routerFileMetadata, writeCalibratedRouters } from '../compiler/apps/calibration/router-file.js';

const [model, data, out] = process.argv.slice(2) as [string, string, string];
const peak = { heapUsed: 0, arrayBuffers: 0, external: 0, rss: 0 };
/** Live memory: collect garbage first (node runs with --expose-gc), so the peaks are what is held. */
const gc = (globalThis as { gc?: () => void }).gc;
const sample = () => {
  gc?.();
  const m = process.memoryUsage();
  peak.heapUsed = Math.max(peak.heapUsed, m.heapUsed);
  peak.arrayBuffers = Math.max(peak.arrayBuffers, m.arrayBuffers);
  peak.external = Math.max(peak.external, m.external);
  peak.rss = Math.max(peak.rss, m.rss);
};
const sequences = readDataset(data, { vocabSize: null });
const result = await calibrate(model, sequences, {
  targetCompute: 0.9,
  granularity: 'block',
  capacities: [0.5],
  sensitivityTokens: 512,
  refineRounds: 1,
  batchTokens: 1024,
  onProgress: sample,
});
sample();
writeCalibratedRouters(out, result, routerFileMetadata(result, { path: data, tokens: result.report.tokens, sequences: result.report.sequences }));
console.log(JSON.stringify({ peak, tokens: result.report.tokens }));
