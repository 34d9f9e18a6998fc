/**
 * Which model a compiled model came from. `modc compile` records a fingerprint of its input's
 * graph in the output's metadata (`modc.source`); `modc verify ORIGINAL COMPILED` refuses a pair
 * whose ORIGINAL does not have that fingerprint.
 *
 * The fingerprint is a SHA-256 over the graph as modc reads it: inputs and outputs (names and
 * types), every node in order (op, domain, name, inputs, outputs, attributes, subgraphs) and every
 * initializer (name, type, dims, and its inline bytes, or for external data the file, offset and
 * length: external weights are never read). Model-level metadata is not part of it, so a copy or
 * a re-save of the original still matches.
 */
import { createHash, type Hash } from 'node:crypto';
import { ModcError } from '../core/errors.js';
import type { Graph } from '../core/ir/graph.js';
import type { Model } from '../core/ir/model.js';

export const SOURCE_METADATA_KEY = 'modc.source';

/** JSON of a proto fragment with byte arrays and 64-bit ints spelled out, deterministically. */
function stable(x: unknown): string {
  return JSON.stringify(x, (_key, v: unknown) => {
    if (v instanceof Uint8Array) return `bytes:${createHash('sha256').update(v).digest('hex')}`;
    if (typeof v === 'bigint') return v.toString();
    if (v && typeof v === 'object' && 'low' in v && 'high' in v && 'unsigned' in v) return String((v as { toString(): string }).toString());
    return v;
  });
}

function hashGraph(h: Hash, g: Graph): void {
  h.update(`graph ${g.name ?? ''}\n`);
  for (const v of g.inputs) h.update(`in ${v.name} ${stable(v.type)}\n`);
  for (const v of g.outputs) h.update(`out ${v.name} ${stable(v.type)}\n`);
  for (const [name, v] of [...g.initializers].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) {
    const t = v.initializer;
    if (!t) continue;
    const { raw_data: raw, external_data: _ext, ...rest } = t.proto as typeof t.proto & { raw_data?: Uint8Array; external_data?: unknown };
    h.update(`init ${name} ${stable(rest)}`);
    if (t.external) h.update(` external ${t.external.location} ${t.external.offset} ${t.external.length}`);
    else if (raw) h.update(' raw ').update(raw);
    h.update('\n');
  }
  for (const n of g.nodes) {
    h.update(`node ${n.domain}::${n.opType} ${n.name} (${n.inputs.map((v) => v?.name ?? '').join(',')}) -> (${n.outputs.map((v) => v.name).join(',')})`);
    for (const [name, a] of [...n.attributes].sort(([x], [y]) => (x < y ? -1 : x > y ? 1 : 0))) {
      const { g: _g, graphs: _gs, ...proto } = a.proto as typeof a.proto & { g?: unknown; graphs?: unknown };
      h.update(` @${name}=${stable(proto)}`);
      if (a.graph) hashGraph(h, a.graph);
      for (const sub of a.graphs ?? []) hashGraph(h, sub);
    }
    h.update('\n');
  }
}

/** The fingerprint of a model's graph (hex SHA-256), see the file comment. */
export function graphFingerprint(model: Model): string {
  const h = createHash('sha256');
  hashGraph(h, model.graph);
  return h.digest('hex');
}

/** Records `fingerprint` (of the model this one is compiled from) in `model`'s metadata. */
export function recordSource(model: Model, fingerprint: string): void {
  model.metadataProps = [...model.metadataProps.filter((p) => p.key !== SOURCE_METADATA_KEY), { key: SOURCE_METADATA_KEY, value: fingerprint }];
}

/** The recorded source fingerprint, or undefined for a model compiled without one. */
export function readSource(model: Model): string | undefined {
  return model.metadataProps.find((p) => p.key === SOURCE_METADATA_KEY)?.value || undefined;
}

/** Throws when `compiled` records a source and `original` is not it. */
export function checkCompiledFrom(original: Model, compiled: Model, originalPath: string, compiledPath: string): void {
  const recorded = readSource(compiled);
  if (recorded === undefined) return;
  const actual = graphFingerprint(original);
  if (recorded !== actual) {
    throw new ModcError(
      `${compiledPath} was not compiled from ${originalPath}: its recorded source graph is ${recorded.slice(0, 12)}, ${originalPath} is ${actual.slice(0, 12)}`,
    );
  }
}
