/**
 * One `modc compile` in a fresh process, for the compile-scale benchmark: runs the CLI's own code
 * (`main(['compile', ...])`) and prints, as one JSON line on stdout, the time it took (wall and CPU), the
 * process's peak resident memory (getrusage maxrss, so node and the modules modc loads count
 * too) and the external weight bytes read.
 *
 *   node dist/bench/compile-probe.js MODEL.onnx OUT.onnx [extra modc compile flags]
 */
import { main } from '../compiler/cli/main.js';
import { externalReads } from '../compiler/core/ir/tensor.js';

const [model, out, ...extra] = process.argv.slice(2);
if (!model || !out) {
  console.error('usage: node dist/bench/compile-probe.js MODEL.onnx OUT.onnx [modc compile flags]');
  process.exit(2);
}
const rssBefore = process.resourceUsage().maxRSS;
const cpu0 = process.cpuUsage();
const t0 = performance.now();
let err = '';
const code = await main(['compile', model, '-o', out, '-q', ...extra], { out: () => {}, err: (t) => (err += t + '\n') });
const compileMs = performance.now() - t0;
const cpu = process.cpuUsage(cpu0);
// CPU time (user + system) of this process during the compile: on a machine shared with other
// work it is the wall time the compile would take alone (the compile is single-threaded).
console.log(
  JSON.stringify({
    code,
    compileMs,
    cpuMs: (cpu.user + cpu.system) / 1000,
    peakRssBytes: process.resourceUsage().maxRSS * 1024,
    rssBeforeCompileBytes: rssBefore * 1024,
    weightBytesRead: externalReads.bytes,
    stderr: err.trim(),
  }),
);
process.exitCode = code;
