/** `modc codegen`: write a typed TypeScript session wrapper for a model. */
import { basename, resolve } from 'node:path';
import { ModcError, UsageError } from '../../core/errors.js';
import { loadModel } from '../../core/io/load.js';
import { checkOutputPath } from '../../core/io/save.js';
import type { Command } from '../command.js';
import { onePositional, stringFlag } from '../shared.js';

const IDENTIFIER = /^[A-Za-z_$][A-Za-z0-9_$]*$/;

export const codegenCommand: Command = {
  name: 'codegen',
  summary: 'write a typed TypeScript session wrapper (prefill/step, caches, routing) for a model',
  usage: 'modc codegen MODEL.onnx -o session.ts [--class NAME] [--json]',
  details: [
    'The wrapper imports only onnxruntime-node. It declares each graph input and output (name,',
    'element type, symbolic shape) as types, the decoder contract (KV caches per layer, the slot',
    'validity past_valid.l / present_valid.l or cache lengths past_lengths.l / present_lengths.l of',
    'modc-compiled layers, extra state of hybrid models)',
    'and the routing metadata (modc.routing) as constants, and a class whose prefill()/step() keep',
    'the caches between calls. It compiles with tsc --strict under --module nodenext. The output is',
    'written atomically and never over the input.',
  ].join('\n'),
  options: {
    output: { type: 'string', short: 'o', valueName: 'session.ts', help: 'where to write the wrapper (required)' },
    class: { type: 'string', valueName: 'NAME', help: 'name of the exported session class (default DecoderSession)' },
    json: { type: 'boolean', help: 'print { output, inputs, outputs, layers, state, routed } on stdout' },
  },
  async run(positionals, values, io) {
    const input = onePositional(positionals, 'model path', 'codegen');
    const output = stringFlag(values, 'output');
    if (!output) throw new UsageError('missing -o session.ts');
    const className = stringFlag(values, 'class') ?? 'DecoderSession';
    if (!IDENTIFIER.test(className)) throw new UsageError(`--class must be a TypeScript identifier, got '${className}'`);
    if (resolve(input) === resolve(output)) throw new ModcError(`refusing to overwrite the input model ${input}; choose another output path`);
    const model = loadModel(input);
    checkOutputPath(output, model);
    // ts-morph (and the TypeScript compiler under it) loads only for this command.
    const { sessionContract, emitSession } = await import('../../apps/codegen/index.js');
    const { writeTextAtomic } = await import('../../core/io/write-text.js');
    const contract = sessionContract(model, basename(input));
    writeTextAtomic(output, emitSession(contract, { className }));
    const facts = {
      output,
      inputs: contract.inputs.length,
      outputs: contract.outputs.length,
      layers: contract.io.kv.length,
      state: contract.io.state.length,
      routed: contract.routing?.layers.length ?? 0,
    };
    io.out(
      values.json
        ? JSON.stringify(facts, null, 2)
        : `wrote ${output}: ${className} over ${facts.inputs} inputs, ${facts.outputs} outputs, ${facts.layers} cached layers${facts.state ? `, ${facts.state} state tensors` : ''}${facts.routed ? `, ${facts.routed} routed parts` : ''}`,
    );
    return 0;
  },
};
