/** A readable text form of a graph, one node per line (for dumps and debugging). */
import { dataTypeName } from './dtype.js';
import type { Graph, Value } from './graph.js';
import type { Model } from './model.js';

function typeOf(v: Value): string {
  const dt = v.dtype;
  const shape = v.shape;
  if (dt === undefined) return '';
  return `: ${dataTypeName(dt)}${shape ? `[${shape.map((d) => (d === null ? '?' : d)).join(',')}]` : ''}`;
}

export function printGraph(g: Graph, indent = ''): string {
  const lines: string[] = [];
  lines.push(`${indent}graph ${g.name || '<unnamed>'} (`);
  for (const v of g.inputs) lines.push(`${indent}  in  %${v.name}${typeOf(v)}`);
  for (const v of g.initializers.values())
    if (!g.inputs.includes(v)) lines.push(`${indent}  init %${v.name}${typeOf(v)}${v.initializer?.isExternal ? ' (external)' : ''}`);
  lines.push(`${indent}) {`);
  for (const n of g.nodes) {
    const attrs = [...n.attributes.keys()];
    lines.push(`${indent}  ${n.toString()}${attrs.length ? ` {${attrs.join(', ')}}` : ''}`);
    for (const sg of n.subgraphs()) lines.push(printGraph(sg, indent + '    '));
  }
  lines.push(`${indent}  return ${g.outputs.map((v) => `%${v.name}${typeOf(v)}`).join(', ')}`);
  lines.push(`${indent}}`);
  return lines.join('\n');
}

export function printModel(m: Model): string {
  const parts = [printGraph(m.graph)];
  for (const f of m.functions) parts.push(`function ${f.key}\n${printGraph(f.body, '  ')}`);
  return parts.join('\n\n');
}
