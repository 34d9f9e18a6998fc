/**
 * modc's programmatic API: load -> compile -> save -> run.
 *
 *   import { compile, loadModel, saveModel, ModSession } from 'modc';
 *   const model = loadModel('model.onnx');
 *   const { report } = compile(model, { routers: { kind: 'all-pass' } });
 *   saveModel(model, 'out.onnx');
 *   const session = await ModSession.create('out.onnx');
 *
 * The lower floors (analysis, plan, passes) are exported for tools that need them.
 */
export { ModcError, UsageError, quote } from './core/errors.js';
export { loadModel, modelFromBytes } from './core/io/load.js';
export { checkOutputPath, saveModel, type SaveOptions, type SaveResult } from './core/io/save.js';
export { Graph, Node, Value, attribute, type Attribute, type Dim, type Use } from './core/ir/graph.js';
export { Model, OnnxFunction } from './core/ir/model.js';
export { Tensor, externalReads, type ExternalLocation } from './core/ir/tensor.js';
export { DataType, dataTypeName } from './core/ir/dtype.js';
export { printGraph, printModel } from './core/ir/print.js';
export { verifyModel, assertValid, type VerifyIssue } from './core/ir/validate.js';
export {
  PassRegistry,
  runPipeline,
  type Pass,
  type PassContext,
  type PassResult,
  type PassRecord,
  type PipelineStep,
  type PipelineOptions,
  type OptionSpec,
} from './passes/pass-manager.js';
export { summarizeModel, type ModelSummary } from './core/ir/model-summary.js';
export { createSession, type SessionOptions, type ExecutionProvider } from './runtime/ort.js';
export {
  compile,
  type CompileRequest,
  type CompileOptions,
  type CompileResult,
  type CompileReport,
  type ConvertedPart,
  type DenseLayer,
  type RoutingRequest,
} from './passes/compile.js';
export { defaultRegistry } from './passes/pipeline.js';
export { analyzeDecoder, extractDecoder, summarizeStructure, formatLayerTable } from './analysis/index.js';
export { LayerByLayerRunner } from './runtime/layer-runner.js';
export type { DecoderStructure, LayerInfo, KvCacheSpec, SideInput, AttentionForm } from './analysis/types.js';
export { planRouting, parseLayerSpec, type RoutingPlan, type LayerPlan, type PlanRequest, type RoutedPart } from './routing/routing-plan.js';
export { readRouterFile, loadRouterFile, writeRouterFile, type LayerRouter, type RouterFile, type RouterFileMetadata } from './routing/router-weights.js';
export { readRoutingMetadata, type RoutingMetadata } from './metadata/routing-metadata.js';
export { subLayersOf, type SubLayer, type SubLayers } from './analysis/sub-layers.js';
export {
  ModSession,
  maskFeed,
  causalMask,
  type Logits,
  type GenerateResult,
  type MaskRule,
  type ModSessionOptions,
  type SessionCheckpoint,
} from './runtime/session.js';
export { decoderIo, type DecoderIo } from './metadata/decoder-io.js';
export { ModReference } from './apps/reference/mod-reference.js';
export { graphFingerprint, recordSource, readSource, checkCompiledFrom, SOURCE_METADATA_KEY } from './metadata/source-fingerprint.js';
export { modPipeline, type ModOptions } from './passes/pipeline.js';
export { evaluate, type EvalOptions, type EvalResult, type LayerEval } from './apps/eval/index.js';
export { modelCosts, readCosts, type ModelCosts, type LayerCost } from './analysis/cost.js';
export { readDataset, loadDataset, loadTokenizer, type Dataset, type DatasetOptions } from './apps/data/index.js';
export { calibrate, Calibrator, type CalibrateOptions, type CalibrationResult, type CalibrationReport } from './apps/calibration/calibrate.js';
export { routerFileMetadata, writeCalibratedRouters } from './apps/calibration/router-file.js';
