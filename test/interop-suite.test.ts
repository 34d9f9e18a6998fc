/**
 * The interop suite's harness (test/interop): which exports it reads, from where, and the one
 * line it fails with when ../shared/models is not beside the clone. The suite itself runs with
 * `npm run test:interop`.
 */
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { REAL_EXPORTS, SHARED_MODELS, sharedModelsProblem } from './interop/shared-models.js';
import { ROOT, tempDir } from './helpers.js';

const tmp = tempDir('modc-interop-harness');

describe('the interop suite', () => {
  it('reads the exports in place from ../shared/models beside the clone, one entry per export', () => {
    expect(SHARED_MODELS).toBe(resolve(ROOT, '..', 'shared', 'models'));
    expect(REAL_EXPORTS.map((e) => e.name)).toEqual([
      'ort-gpt2-fused',
      'ort-qwen2-gqa',
      'mobius-attn24-dynamic-kv',
      'mobius-gqa-fp16-packed',
      'ort-gpt2-megatron-4dmask',
    ]);
  });

  it('without the folder: one line naming what is missing and where to get it', () => {
    const missing = join(tmp, 'nowhere', 'shared', 'models');
    const problem = sharedModelsProblem(missing)!;
    expect(problem).not.toContain('\n');
    expect(problem).toMatch(
      new RegExp(`^missing ${missing}: .*\\.\\./shared/models, the folder beside the clone; its README\\.md names the public repository`),
    );
  });

  it('with some exports absent: names each missing file; with all of them: no problem', () => {
    const dir = join(tmp, 'models');
    const [first, ...rest] = REAL_EXPORTS;
    mkdirSync(join(dir, first!.name), { recursive: true });
    writeFileSync(join(dir, first!.name, first!.file), '');
    const problem = sharedModelsProblem(dir)!;
    for (const e of rest) expect(problem).toContain(join(dir, e.name, e.file));
    expect(problem).not.toContain(join(dir, first!.name));
    for (const e of rest) {
      mkdirSync(join(dir, e.name), { recursive: true });
      writeFileSync(join(dir, e.name, e.file), '');
    }
    expect(sharedModelsProblem(dir)).toBeNull();
  });

  it('is its own vitest project, run by npm run test:interop and by CI after the slow suite; npm test leaves it out', () => {
    const config = readFileSync(join(ROOT, 'vitest.config.ts'), 'utf8');
    expect(config).toMatch(/name: 'interop',\s*include: \['test\/interop\/\*\*\/\*\.test\.ts'\],\s*globalSetup: \['test\/interop\/require-shared\.ts'\]/);
    expect(config).toMatch(/name: 'quick',\s*include: \['test\/\*\*\/\*\.test\.ts'\],\s*exclude: \['test\/slow\/\*\*', 'test\/interop\/\*\*'/);
    const scripts = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')).scripts;
    expect(scripts['test:interop']).toMatch(/vitest run --project interop$/);
    expect(readFileSync(join(ROOT, '.ci', 'run'), 'utf8')).toMatch(/npm run test:slow\nnpm run test:interop\n/);
  });
});
