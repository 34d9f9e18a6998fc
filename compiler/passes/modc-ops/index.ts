/**
 * Placing modc ops in a model: as a call to a model-local function (domain `modc`, the body
 * added once per model), or with `inline` as the body's nodes themselves, for runtimes without
 * local functions.
 */
import type { Graph, Node, Value } from '../../core/ir/graph.js';
import { OnnxFunction, type Model } from '../../core/ir/model.js';
import { Value as IrValue } from '../../core/ir/graph.js';
import { ModcError } from '../../core/errors.js';
import { Emitter } from './emitter.js';
import { modcOp, type OpContext } from './op-bodies.js';

export const MODC_DOMAIN = 'modc';
export const MODC_DOMAIN_VERSION = 1;

export interface CallOptions extends OpContext {
  /** Emit the body's nodes in the graph instead of a function call. */
  inline?: boolean;
  /** Insert before this node (default: append). */
  before?: Node;
  /** The graph to emit into (default: the model's main graph), e.g. an If branch. */
  graph?: Graph;
  /** Readable prefix for the new values. */
  name?: string;
}

/** The model's default-domain opset: function bodies are written for it. */
export function defaultOpset(model: Model): number {
  const v = model.opsetVersion('');
  // The bodies must use the operator forms of the model's own opset: never guess one.
  if (v === undefined) throw new ModcError('the model imports no default-domain (ai.onnx) opset, so modc cannot tell which operator versions to emit');
  if (v < 11) throw new ModcError(`the model's default-domain opset is ${v}; modc emits its ops for opset 11 and later`);
  return v;
}

/** Adds the function for `name` to the model if it is not there yet. */
export function ensureModcFunction(model: Model, name: string, ctx: OpContext): OnnxFunction {
  const existing = model.findFunction(MODC_DOMAIN, name);
  if (existing) return existing;
  const def = modcOp(name);
  const fn = new OnnxFunction(MODC_DOMAIN, name);
  fn.docString = def.doc;
  const inputs = def.inputs.map((n) => fn.body.addInput(new IrValue(n)));
  const opset = defaultOpset(model);
  fn.body.outputs = def.body(new Emitter(fn.body, opset), inputs, ctx);
  fn.opsetImports = [{ domain: '', version: opset }];
  model.functions.push(fn);
  model.importOpset(MODC_DOMAIN, MODC_DOMAIN_VERSION);
  return fn;
}

/** Emits one modc op on `inputs`; returns its outputs. */
export function callModcOp(model: Model, name: string, inputs: Value[], opts: CallOptions): Value[] {
  const def = modcOp(name);
  const prefix = opts.name ? `${opts.name}/` : `${name}/`;
  if (opts.inline) {
    const e = new Emitter(opts.graph ?? model.graph, defaultOpset(model), prefix, opts.before);
    return def.body(e, inputs, opts);
  }
  ensureModcFunction(model, name, opts);
  const g = opts.graph ?? model.graph;
  const outs = def.outputs.map((o) => g.newValue(`${prefix}${o}`));
  g.addNode(name, inputs, outs, { domain: MODC_DOMAIN, before: opts.before, name: opts.name ? `${opts.name}/${name}` : undefined });
  return outs;
}

export { MODC_OPS, modcOp, type ModcOpDef, type OpContext } from './op-bodies.js';
export * as reference from './kernels.js';
