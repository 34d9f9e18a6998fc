/** `modc inspect`: what a model is, as text or JSON. */
import { loadModel } from '../io/load.js';
import { summarizeModel } from '../summary.js';
import { onePositional } from './args.js';
import type { Command } from './command.js';
import { formatSummary } from './format.js';

export const inspectCommand: Command = {
  name: 'inspect',
  summary: 'show a model: versions, inputs and outputs, op histogram, parameters',
  usage: 'modc inspect MODEL.onnx [--json]',
  details: 'External weights are never read: sizes come from the model\'s own metadata.',
  options: {
    json: { type: 'boolean', help: 'print one JSON object on stdout instead of text' },
  },
  async run(positionals, values, io) {
    const path = onePositional(positionals, 'model path', 'inspect');
    const model = loadModel(path);
    const summary = summarizeModel(model);
    io.out(values.json ? JSON.stringify(summary, null, 2) : formatSummary(summary));
    return 0;
  },
};
