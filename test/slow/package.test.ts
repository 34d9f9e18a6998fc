/**
 * The npm package as a user gets it: `npm pack` (prepack builds dist/), a global install of the
 * tarball into a temp prefix, the installed `modc` (--version, compile and inspect a fixture),
 * and examples/library.ts type-checked strictly and run against the installed package.
 *
 * The install uses --ignore-scripts (onnxruntime-node's install script only fetches CUDA
 * libraries; the CPU provider ships in the npm package) and --prefer-offline (after `npm ci`
 * every dependency is in npm's cache).
 */
import { execFileSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { fixture, ROOT, tempDir } from '../helpers.js';

const tmp = tempDir('modc-pack');
const prefix = join(tmp, 'prefix');
const modc = join(prefix, 'bin', 'modc');
const version = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;
let files: string[] = [];

function run(cmd: string, args: string[], cwd = tmp): string {
  return execFileSync(cmd, args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, npm_config_loglevel: 'error' } });
}

describe('npm package', () => {
  beforeAll(() => {
    const out = run('npm', ['pack', '--json', '--pack-destination', tmp], ROOT);
    const report = JSON.parse(out.slice(out.indexOf('['))) as { filename: string; files: { path: string }[] }[];
    files = report[0]!.files.map((f) => f.path);
    run('npm', ['install', '--global', '--prefix', prefix, '--ignore-scripts', '--prefer-offline', '--no-audit', '--no-fund', join(tmp, report[0]!.filename)]);
  }, 600_000);

  it('ships the build, the command, the docs and the licence, and no tests, fixtures or sources', () => {
    for (const f of [
      'package.json',
      'README.md',
      'LICENSE',
      'docs/SPEC.md',
      'bin/modc.js',
      'dist/compiler/index.js',
      'dist/compiler/index.d.ts',
      'dist/compiler/cli/main.js',
      'dist/compiler/passes/pipeline.js',
      'examples/library.ts',
    ]) {
      expect(files, f).toContain(f);
    }
    expect(files.filter((f) => /^(test|fixtures|bench|compiler|passes)\/|^dist\/(test|fixtures|bench)\/|\.map$|\.onnx$/.test(f))).toEqual([]);
  });

  it('installs a working modc: --version, compile and inspect a fixture', () => {
    expect(run(modc, ['--version']).trim()).toBe(version);
    const out = join(tmp, 'compiled', 'model.onnx');
    run(modc, ['compile', fixture('forms-fused-gpt2-tiny'), '-o', out, '--router-init', 'all-pass', '-q']);
    expect(existsSync(out)).toBe(true);
    const report = JSON.parse(run(modc, ['inspect', out, '--json'])) as Record<string, unknown>;
    expect(JSON.stringify(report)).toMatch(/Router/);
  });

  it('examples/library.ts type-checks strictly and runs against the installed package', () => {
    const app = join(tmp, 'app');
    mkdirSync(join(app, 'node_modules'), { recursive: true });
    writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'app', private: true, type: 'module' }));
    symlinkSync(join(prefix, 'lib', 'node_modules', 'modc'), join(app, 'node_modules', 'modc'));
    copyFileSync(join(ROOT, 'examples', 'library.ts'), join(app, 'library.ts'));
    const tsc = join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc');
    run(
      process.execPath,
      [
        tsc,
        '--strict',
        '--module',
        'nodenext',
        '--moduleResolution',
        'nodenext',
        '--target',
        'es2022',
        '--skipLibCheck',
        '--typeRoots',
        join(ROOT, 'node_modules', '@types'),
        '--types',
        'node',
        '--outDir',
        join(app, 'out'),
        join(app, 'library.ts'),
      ],
      app,
    );
    const stdout = run(process.execPath, [join(app, 'out', 'library.js'), fixture('llama-tiny'), join(tmp, 'example-out')], app);
    expect(stdout).toMatch(/converted layers 1; wrote /);
    expect(stdout).toMatch(/^row 0: 5 6 7 8( \d+){6}$/m);
    expect(stdout).toMatch(/^row 1: 9 10( \d+){6}$/m);
    expect(existsSync(join(tmp, 'example-out', 'model.onnx'))).toBe(true);
  });
});
