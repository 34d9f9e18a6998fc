/**
 * modc as a library: compile a decoder into a Mixture-of-Depths model, then run it.
 *
 *   npx tsx examples/library.ts [MODEL.onnx] [OUT_DIR]
 *
 * From a clone (after `npm ci`) 'modc' resolves to this package itself; in an application it is
 * the installed package. Defaults: the bundled fixtures/llama-tiny, a temp output folder.
 */
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { compile, loadModel, ModSession, saveModel } from 'modc';

async function main(): Promise<void> {
  const input = process.argv[2] ?? 'fixtures/llama-tiny/model.onnx';
  const outDir = process.argv[3] ?? mkdtempSync(join(tmpdir(), 'modc-example-'));
  const output = join(outDir, 'model.onnx');

  // load -> compile (analyse, plan, passes) -> save
  const model = loadModel(input);
  const { report } = compile(model, { routers: { kind: 'random', seed: 1 }, schedule: 'every-other' });
  const saved = saveModel(model, output);
  console.log(`${input}: converted layers ${report.converted.map((l) => l.layer).join(', ')}; wrote ${saved.path} (${saved.bytes} bytes)`);

  // The same session API runs the original and the compiled model.
  const session = await ModSession.create(output);
  const result = await session.generate(
    [
      [5, 6, 7, 8],
      [9, 10],
    ],
    { maxNewTokens: 6 },
  );
  result.ids.forEach((ids, row) => console.log(`row ${row}: ${ids.join(' ')}`));
  console.log(`KV cache: ${session.kvBytes()} bytes; real tokens per layer and row: ${JSON.stringify(session.layerCacheLengths())}`);
}

main().catch((e: unknown) => {
  console.error(`example failed: ${e instanceof Error ? e.message : String(e)}`);
  process.exitCode = 1;
});
