/**
 * lift-constants: Constant nodes (pattern `Constant{value=T}`) become initializers, so analyses
 * and passes see every constant the same way.
 */
import { Tensor } from '../core/ir/tensor.js';
import type { Graph } from '../core/ir/graph.js';
import type { Pass } from './pass-manager.js';

function liftGraph(g: Graph): number {
  let lifted = 0;
  for (const n of [...g.nodes]) {
    for (const sg of n.subgraphs()) lifted += liftGraph(sg);
    if (n.opType !== 'Constant' || (n.domain !== '' && n.domain !== 'ai.onnx')) continue;
    const t = n.attr('value')?.t;
    if (!t || n.attributes.size !== 1 || g.outputs.includes(n.output(0))) continue;
    const out = n.output(0);
    g.removeNode(n, true);
    g.addInitializer(out, new Tensor({ ...t, name: out.name }));
    out.producer = null;
    out.producerIndex = -1;
    lifted++;
  }
  return lifted;
}

export const liftConstantsPass: Pass = {
  name: 'lift-constants',
  description: 'turn Constant nodes holding a tensor into initializers',
  run(model) {
    const lifted = liftGraph(model.graph);
    return { changed: lifted > 0, notes: lifted ? [`lifted ${lifted} Constant nodes`] : [] };
  },
};
