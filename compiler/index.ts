/**
 * modc's programmatic API: load -> analyse -> run passes -> save -> run.
 *
 *   import { loadModel, runPipeline, defaultRegistry, saveModel } from 'modc';
 *   const model = loadModel('model.onnx');
 *   runPipeline(model, defaultRegistry().parsePipeline('cleanup'));
 *   saveModel(model, 'out.onnx');
 */
export { ModcError, UsageError } from './errors.js';
export { loadModel, modelFromBytes } from './io/load.js';
export { saveModel, type SaveOptions, type SaveResult } from './io/save.js';
export { Graph, Node, Value, attribute, type Attribute, type Dim, type Use } from './ir/graph.js';
export { Model, OnnxFunction } from './ir/model.js';
export { Tensor, externalReads, type ExternalLocation } from './ir/tensor.js';
export { DataType, dataTypeName } from './ir/dtype.js';
export { printGraph, printModel } from './ir/print.js';
export { verifyModel, assertValid, type VerifyIssue } from './ir/verify.js';
export { PassRegistry, runPipeline, type Pass, type PassContext, type PassResult, type PassRecord, type PipelineStep, type PipelineOptions, type OptionSpec } from './pass-manager.js';
export { summarizeModel, type ModelSummary } from './summary.js';
export { createSession, type SessionOptions, type ExecutionProvider } from './runtime/ort.js';
export { defaultRegistry } from '../passes/index.js';
