import { defineConfig } from 'vitest/config';

/**
 * Three projects, so that `npm test` stays short and needs nothing beside the clone:
 * - quick (`npm test`): every test file outside test/slow/, test/interop/ and SLOW_FILES; the
 *   per-model MoD contract (test/mod.test.ts) on QUICK_MODELS only (test/helpers.ts).
 * - slow (`npm run test:slow`): test/slow/ (packaging, long end-to-end runs), SLOW_FILES, and
 *   the per-model contract on the other fixtures.
 * - interop (`npm run test:interop`): test/interop/, real third-party exports read in place from
 *   ../shared/models (the folder beside the clone); it fails at once, in one line, without it.
 * `npx vitest run` with no --project runs all three: the whole suite, each per-model case once.
 */
/**
 * Files whose per-model cases (describe.each(contractModels())) split between the projects; they
 * run in both, so any other case in them runs twice.
 */
const SPLIT_BY_MODEL = ['test/mod.test.ts', 'test/last-logits.test.ts', 'test/oracle.test.ts', 'test/granularity.test.ts', 'test/cuda-kernels.test.ts'];
/** Whole files that are slow end-to-end runs of several commands on real sessions. */
const SLOW_FILES = ['test/verify.test.ts', 'test/codegen-e2e.test.ts'];

export default defineConfig({
  test: {
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // onnxruntime-node sessions are heavy; two workers match the 2-core CI machine.
    maxWorkers: 2,
    reporters: ['default', './test/count-reporter.ts'],
    projects: [
      {
        extends: true,
        test: {
          name: 'quick',
          include: ['test/**/*.test.ts'],
          exclude: ['test/slow/**', 'test/interop/**', ...SLOW_FILES],
          env: { MODC_TEST_MODELS: 'quick' },
          // Test files share each worker's module graph instead of re-importing onnxruntime-node
          // and the compiler per file: 76 s -> 44 s for this project on 2 cores. No test mocks
          // modules or changes process-wide state (cwd, env) that another file reads.
          isolate: false,
        },
      },
      {
        extends: true,
        test: {
          name: 'slow',
          include: ['test/slow/**/*.test.ts', ...SLOW_FILES, ...SPLIT_BY_MODEL],
          env: { MODC_TEST_MODELS: 'rest' },
          testTimeout: 300_000,
          hookTimeout: 300_000,
        },
      },
      {
        extends: true,
        test: {
          name: 'interop',
          include: ['test/interop/**/*.test.ts'],
          globalSetup: ['test/interop/require-shared.ts'],
          testTimeout: 300_000,
          hookTimeout: 300_000,
        },
      },
    ],
  },
});
