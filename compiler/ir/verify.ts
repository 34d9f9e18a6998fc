/**
 * IR verifier: the invariants every pass must leave intact. Each issue names the node (or graph
 * value) at fault so a failing pass can be debugged from the message alone.
 */
import { ModcError } from '../errors.js';
import type { Graph, Value } from './graph.js';
import type { Model } from './model.js';

export interface VerifyIssue {
  graph: string;
  message: string;
}

export function verifyModel(model: Model): VerifyIssue[] {
  const issues: VerifyIssue[] = [];
  verifyGraph(model.graph, new Set(), issues, true);
  for (const f of model.functions) verifyGraph(f.body, new Set(), issues, false);
  return issues;
}

/** Throws a ModcError carrying the first issue (and how many more there are). */
export function assertValid(model: Model, context = 'model'): void {
  const issues = verifyModel(model);
  if (issues.length === 0) return;
  const more = issues.length > 1 ? ` (and ${issues.length - 1} more)` : '';
  throw new ModcError(`invalid ${context}: ${issues[0]!.message}${more}`);
}

function verifyGraph(g: Graph, outer: ReadonlySet<Value>, issues: VerifyIssue[], isMain: boolean): void {
  const report = (message: string) => issues.push({ graph: g.name, message });
  const defined = new Set<Value>();
  const define = (v: Value, where: string) => {
    if (v.name === '') return; // an omitted optional output
    if (defined.has(v)) report(`${where} redefines %${v.name}`);
    defined.add(v);
  };
  for (const v of g.inputs) define(v, `graph input`);
  for (const v of g.initializers.values()) if (!g.inputs.includes(v)) define(v, `initializer`);
  const visible = (v: Value) => defined.has(v) || outer.has(v);
  const names = new Map<string, Value>();
  for (const n of g.nodes) {
    if (n.graph !== g) report(`${n.describe()} is listed in graph '${g.name}' but points at another graph`);
    n.inputs.forEach((v, i) => {
      if (!v) return;
      if (![...v.uses].some((u) => u.node === n && u.index === i)) report(`${n.describe()} input ${i} (%${v.name}) is missing from that value's use list`);
      if (visible(v)) return;
      const producedLater = v.producer && v.producer.graph === g;
      report(producedLater ? `${n.describe()} reads %${v.name} before it is defined (graph is not in topological order)`
        : `${n.describe()} reads %${v.name}, which nothing defines`);
    });
    const subgraphs = n.subgraphs();
    // Built only for nodes with subgraphs: a copy per node made verification quadratic.
    if (subgraphs.length) {
      const inner = new Set([...outer, ...defined]);
      for (const sg of subgraphs) verifyGraph(sg, inner, issues, false);
    }
    for (const v of n.outputs) {
      if (v.producer !== n) report(`${n.describe()} lists output %${v.name} whose producer is another node`);
      define(v, n.describe());
      const clash = names.get(v.name);
      if (v.name && clash && clash !== v) report(`${n.describe()} output name %${v.name} is used by another value`);
      names.set(v.name, v);
    }
  }
  for (const v of g.outputs) if (!visible(v)) report(`graph output %${v.name} is not defined in graph '${g.name}'`);
  if (isMain) {
    for (const v of g.inputs) if (!v.type) report(`graph input %${v.name} has no type`);
    for (const v of g.outputs) if (!v.type) report(`graph output %${v.name} has no type`);
  }
}
