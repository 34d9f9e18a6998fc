/**
 * The source tree's shape: data flows one way through the folders of compiler/ (core, analysis,
 * routing, metadata, passes, runtime, apps, cli), no module imports a folder above its own, the
 * commands share code only through cli/shared.ts, and no import cycle exists anywhere.
 */
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ROOT } from './helpers.js';

const SRC = join(ROOT, 'compiler');
/** Bottom to top. index.ts, the public API, sits above them all. */
const LAYERS = ['core', 'analysis', 'routing', 'metadata', 'passes', 'runtime', 'apps', 'cli'];

function sources(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const p = join(dir, name);
    return statSync(p).isDirectory() ? sources(p) : p.endsWith('.ts') ? [p] : [];
  });
}

const files = sources(SRC);
const imports = new Map(
  files.map((f) => {
    const text = readFileSync(f, 'utf8');
    const specs = [...text.matchAll(/(?:from|import)\s*\(?\s*'(\.{1,2}\/[^']+)'/g)].map((m) => m[1]!);
    return [f, specs.map((s) => resolve(dirname(f), s).replace(/\.js$/, '.ts'))];
  }),
);
const layerOf = (f: string): number => {
  const top = relative(SRC, f).split('/')[0]!;
  return top === 'index.ts' ? LAYERS.length : LAYERS.indexOf(top);
};
const rel = (f: string) => relative(SRC, f);

describe('source layering', () => {
  it('every file of compiler/ lies in one of the layer folders (or is the public index)', () => {
    expect(files.filter((f) => layerOf(f) < 0).map(rel)).toEqual([]);
  });

  it('no module imports a module of a layer above its own', () => {
    const upward = files.flatMap((f) =>
      imports
        .get(f)!
        .filter((d) => layerOf(d) > layerOf(f))
        .map((d) => `${rel(f)} -> ${rel(d)}`),
    );
    expect(upward).toEqual([]);
  });

  it('cli commands import no other command', () => {
    const commands = files.filter((f) => rel(f).startsWith('cli/commands/'));
    const crossing = commands.flatMap((f) =>
      imports
        .get(f)!
        .filter((d) => d !== f && rel(d).startsWith('cli/commands/'))
        .map((d) => `${rel(f)} -> ${rel(d)}`),
    );
    expect(crossing).toEqual([]);
  });

  it('no import cycle', () => {
    // Tarjan's strongly connected components over the import graph.
    let next = 0;
    const index = new Map<string, number>();
    const low = new Map<string, number>();
    const stack: string[] = [];
    const onStack = new Set<string>();
    const cycles: string[][] = [];
    const visit = (v: string): void => {
      index.set(v, next);
      low.set(v, next++);
      stack.push(v);
      onStack.add(v);
      for (const w of imports.get(v) ?? []) {
        if (!imports.has(w)) continue;
        if (!index.has(w)) {
          visit(w);
          low.set(v, Math.min(low.get(v)!, low.get(w)!));
        } else if (onStack.has(w)) low.set(v, Math.min(low.get(v)!, index.get(w)!));
      }
      if (low.get(v) !== index.get(v)) return;
      const component: string[] = [];
      let w: string;
      do {
        w = stack.pop()!;
        onStack.delete(w);
        component.push(rel(w));
      } while (w !== v);
      if (component.length > 1) cycles.push(component);
    };
    for (const f of files) if (!index.has(f)) visit(f);
    expect(cycles).toEqual([]);
  });

  it('file names are unique across the tree (index.ts aside)', () => {
    const byName = new Map<string, string[]>();
    for (const f of files) {
      const name = f.split('/').at(-1)!;
      if (name !== 'index.ts') byName.set(name, [...(byName.get(name) ?? []), rel(f)]);
    }
    expect([...byName.values()].filter((paths) => paths.length > 1)).toEqual([]);
  });
});
