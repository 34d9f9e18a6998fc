/** Text formatting shared by the commands. */
import type { ModelSummary, TensorSignature } from '../summary.js';

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
  return rows.map((r) => indent + r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join('  ').trimEnd());
}

export function formatSummary(s: ModelSummary): string {
  const lines: string[] = [];
  lines.push(`model      ${s.path ?? '<memory>'}`);
  lines.push(`ir         ${s.irVersion}    opsets: ${s.opsets.map((o) => `${o.domain || 'ai.onnx'} ${o.version}`).join(', ')}`);
  lines.push(`producer   ${[s.producer.name, s.producer.version].filter(Boolean).join(' ') || '(none)'}`);
  lines.push(`inputs     ${s.inputs.length}`);
  lines.push(...table(s.inputs.map((v) => [v.name, v.dtype, formatShape(v.shape)]), '  '));
  lines.push(`outputs    ${s.outputs.length}`);
  lines.push(...table(s.outputs.map((v) => [v.name, v.dtype, formatShape(v.shape)]), '  '));
  lines.push(`nodes      ${formatCount(s.nodes)}`);
  for (const [domain, ops] of Object.entries(s.ops).sort(([a], [b]) => a.localeCompare(b))) {
    const hist = Object.entries(ops).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0])).map(([op, n]) => `${op} ${n}`);
    lines.push(`  ${(domain || 'ai.onnx').padEnd(14)} ${hist.join(', ')}`);
  }
  if (s.functions.length) lines.push(`functions  ${s.functions.join(', ')}`);
  const p = s.parameters;
  lines.push(`params     ${formatCount(p.elements)} in ${p.tensors} tensors, ${formatBytes(p.bytes)} (inline ${formatBytes(p.internalBytes)}, external ${formatBytes(p.externalBytes)}${p.externalFiles.length ? ` in ${p.externalFiles.join(', ')}` : ''})`);
  return lines.join('\n');
}
