/**
 * modc calibrate in bounded memory: a child Node with a heap smaller than the data's activations
 * calibrates it, holding one batch at a time (slow: a minute or more of calibration).
 */
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ROOT, tempDir } from '../helpers.js';
import { HIDDEN, LAYERS, MODEL, writeData } from '../calibrate-data.js';

describe('bounded memory', () => {
  const dir = tempDir('modc-calibrate-mem');

  it('calibrates data whose activations exceed the heap, holding one batch at a time', () => {
    const length = 64;
    const lines = 500;
    const tokens = lines * length;
    // Residual stream values a full capture holds per token: x of each layer, h of each layer, the last output.
    const activationBytes = tokens * (2 * LAYERS + 1) * HIDDEN * 4;
    const heapMiB = 32;
    expect(activationBytes).toBeGreaterThan(1.5 * heapMiB * 2 ** 20);
    const data = join(dir, 'big.jsonl');
    writeData(data, lines, length, 5);
    const child = spawnSync(
      process.execPath,
      [
        `--max-old-space-size=${heapMiB}`,
        '--expose-gc',
        '--import',
        'tsx',
        join(ROOT, 'test', 'calibrate-memory-child.ts'),
        MODEL,
        data,
        join(dir, 'r.safetensors'),
      ],
      { cwd: ROOT, encoding: 'utf8', timeout: 400_000 },
    );
    expect(child.stderr).not.toMatch(/heap out of memory|Error/);
    expect(child.status).toBe(0);
    const report = JSON.parse(child.stdout.trim().split('\n').at(-1)!) as { peak: { heapUsed: number; arrayBuffers: number }; tokens: number };
    expect(report.tokens).toBe(tokens);
    // Typed arrays live outside the V8 heap: bound them too.
    expect(report.peak.heapUsed + report.peak.arrayBuffers).toBeLessThan(activationBytes / 2);
  }, 420_000);
});
