/**
 * inline-modc-ops: replaces every call to a modc function (`modc::Op(...)`) with the function's
 * body, then drops the functions and the modc opset import. For runtimes without model-local
 * function support; ONNX Runtime runs either form.
 */
import type { Model } from '../core/ir/model.js';
import type { Graph, Value } from '../core/ir/graph.js';
import type { Pass } from './pass-manager.js';
import { MODC_DOMAIN } from './modc-ops/index.js';

export function inlineModcOps(model: Model): number {
  const inlined = inlineIn(model, model.graph);
  model.functions = model.functions.filter((f) => f.domain !== MODC_DOMAIN);
  model.opsetImports = model.opsetImports.filter((o) => o.domain !== MODC_DOMAIN);
  return inlined;
}

/** Inlines the calls in `g` and in every subgraph below it (routed layers live in If branches). */
function inlineIn(model: Model, g: Graph): number {
  let inlined = 0;
  for (const n of g.nodes) for (const sg of n.subgraphs()) inlined += inlineIn(model, sg);
  for (const call of g.nodes.filter((n) => n.domain === MODC_DOMAIN)) {
    const fn = model.findFunction(MODC_DOMAIN, call.opType, call.overload);
    if (!fn) continue;
    const mapping = new Map<Value, Value>();
    fn.body.inputs.forEach((v, i) => mapping.set(v, call.input(i)!));
    g.cloneNodes(fn.body.nodes, mapping, { before: call, suffix: `@${call.output(0).name}` });
    call.outputs.forEach((out, i) => {
      const inner = mapping.get(fn.body.outputs[i]!)!;
      const name = out.name;
      const type = out.type;
      out.replaceAllUsesWith(inner);
      if (g.outputs.includes(inner)) {
        // A graph output keeps its name and declared type.
        out.name = g.uniqueName(`${name}_call`);
        inner.name = name;
        inner.type = type;
      }
    });
    g.removeNode(call, true);
    inlined++;
  }
  return inlined;
}

export const inlineModcOpsPass: Pass = {
  name: 'inline-modc-ops',
  description: 'replace modc function calls with their bodies (for runtimes without local functions)',
  run(model) {
    const n = inlineModcOps(model);
    return { changed: n > 0, notes: n ? [`inlined ${n} modc op calls`] : [] };
  },
};
