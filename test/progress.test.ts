/**
 * Progress on stderr (compiler/cli/progress.ts): a bar on a TTY only, one line per stage on a
 * non-TTY only with --progress, nothing with --quiet; a failing command ends with `modc: ...`.
 */
import { Writable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { main } from '../compiler/cli/main.js';
import { progressMode } from '../compiler/cli/progress.js';
import { join } from 'node:path';
import { FIXTURES, fixture, runCli, tempDir } from './helpers.js';

const MODEL = fixture('llama-tiny');

/** A stand-in for a terminal: records what a progress bar writes to it. */
class FakeTty extends Writable {
  readonly isTTY = true;
  readonly columns = 100;
  text = '';
  override _write(chunk: Buffer | string, _enc: BufferEncoding, done: () => void): void {
    this.text += chunk.toString();
    done();
  }
}

async function runOnTty(...args: string[]): Promise<{ code: number; stdout: string; stderr: string; tty: string }> {
  const tty = new FakeTty();
  let stdout = '';
  let stderr = '';
  const code = await main(args, { out: (t) => (stdout += t + '\n'), err: (t) => (stderr += t + '\n'), errStream: tty });
  return { code, stdout, stderr, tty: tty.text };
}

describe('progress', () => {
  it('chooses bar on a TTY, lines only with --progress elsewhere, nothing with --quiet', () => {
    expect(progressMode({}, true)).toBe('bar');
    expect(progressMode({}, false)).toBe('off');
    expect(progressMode({ progress: true }, false)).toBe('lines');
    expect(progressMode({ quiet: true }, true)).toBe('off');
    expect(progressMode({ quiet: true, progress: true }, false)).toBe('off');
  });

  it('prints nothing on a non-TTY stderr by default, and one line per stage with --progress', async () => {
    const plain = await runCli('generate', MODEL, '--ids', '1,2,3', '--max-new', '3');
    expect(plain.code).toBe(0);
    expect(plain.stderr).toBe('');
    const lines = await runCli('generate', MODEL, '--ids', '1,2,3', '--max-new', '3', '--progress');
    expect(lines.code).toBe(0);
    expect(lines.stderr.trim().split('\n')).toEqual(['[load]', '[generate] 4 steps']);
    expect(lines.stdout).toBe(plain.stdout);
    const quiet = await runCli('generate', MODEL, '--ids', '1,2,3', '--max-new', '3', '--progress', '-q');
    expect(quiet.stderr).toBe('');
  });

  it('calibrate reports its stages through the same reporter: one line each with --progress, none with -q', async () => {
    const data = join(FIXTURES, 'data', 'tiny.jsonl');
    const out = (name: string) => join(tempDir('modc-progress-calibrate'), name, 'r.safetensors');
    const lines = await runCli('calibrate', MODEL, '--data', data, '--target-compute', '0.9', '-o', out('a'), '--progress');
    expect(lines.code).toBe(0);
    const stages = lines.stderr.split('\n').filter((l) => l.startsWith('['));
    expect(stages.map((l) => l.replace(/\].*/, ']'))).toEqual([
      '[capturing activations]',
      '[fitting routers]',
      '[scoring tokens]',
      '[measuring sensitivity]',
      '[refining thresholds]',
    ]);
    const quiet = await runCli('calibrate', MODEL, '--data', data, '--target-compute', '0.9', '-o', out('b'), '--progress', '-q');
    expect(quiet.code).toBe(0);
    expect(quiet.stderr).toBe('');
  });

  it('draws a bar on a TTY and clears it, leaving stdout and the err lines alone', async () => {
    const res = await runOnTty('generate', MODEL, '--ids', '1,2,3', '--max-new', '5');
    expect(res.code).toBe(0);
    expect(res.stderr).toBe('');
    expect(res.tty).toMatch(/generate \[/);
    expect(res.tty).toMatch(/6\/6/);
    // clearOnComplete: the last thing written erases the line (ESC[2K) or is the cursor restore.
    expect(res.tty.slice(-20)).toMatch(new RegExp(`${String.fromCharCode(27)}\\[(2K|\\?25h)`));
    const quiet = await runOnTty('generate', MODEL, '--ids', '1,2,3', '--max-new', '5', '--quiet');
    expect(quiet.tty).toBe('');
  });

  it('every command takes --progress and -q', async () => {
    for (const args of [
      ['inspect', MODEL],
      ['run', MODEL, '--ids', '1,2'],
    ]) {
      expect((await runCli(...args, '-q')).code).toBe(0);
      expect((await runCli(...args, '--progress')).code).toBe(0);
    }
    expect((await runCli('compile', '--help')).stdout).toMatch(/--progress/);
    expect((await runCli('--help')).stdout).toMatch(/-q, --quiet/);
  });

  it('a failing command on a TTY leaves the bar cleared and one stderr line, modc: ...', async () => {
    const res = await runOnTty('generate', MODEL, '--ids', '1,2,3', '--max-new', '2', '--force', '7');
    expect(res.code).toBe(1);
    expect(res.stderr.trim().split('\n')).toHaveLength(1);
    expect(res.stderr).toMatch(/^modc: --force has 1 ids but --max-new is 2/);
    const plain = await runCli('compile', MODEL, '-o', '/nonexistent-modc-dir/x/../y.onnx', '--passes', 'no-such-pass');
    expect(plain.code).not.toBe(0);
    const lines = plain.stderr.trim().split('\n');
    expect(lines.length).toBeLessThanOrEqual(2);
    expect(lines.at(-1)).toMatch(/^modc: /);
  });
});
