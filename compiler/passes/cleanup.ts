/**
 * cleanup: dead-code elimination and topological order, the onnx-graphsurgeon
 * `cleanup().toposort()` pair. Subgraphs are cleaned too; unused initializers are dropped.
 */
import type { Graph } from '../core/ir/graph.js';
import type { Pass } from './pass-manager.js';

function cleanGraph(g: Graph): number {
  let removed = 0;
  for (const n of g.nodes) for (const sg of n.subgraphs()) removed += cleanGraph(sg);
  removed += g.eliminateDeadCode();
  g.toposort();
  return removed;
}

export const cleanupPass: Pass = {
  name: 'cleanup',
  description: 'remove nodes and initializers no output depends on, then sort nodes topologically',
  run(model) {
    const before = model.graph.nodes.map((n) => n);
    const removed = cleanGraph(model.graph);
    const reordered = model.graph.nodes.some((n, i) => before[i] !== n);
    return { changed: removed > 0 || reordered, notes: removed ? [`removed ${removed} dead nodes`] : [] };
  },
};
