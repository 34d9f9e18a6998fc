import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // onnxruntime-node sessions are heavy; two workers match the 2-core CI machine.
    maxWorkers: 2,
    reporters: ['default', './test/count-reporter.ts'],
  },
});
