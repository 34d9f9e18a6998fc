/**
 * modc's programmatic API: load -> analyse -> run passes -> save -> run.
 *
 *   import { loadModel, analyzeDecoder, planRouting, modPipeline, runPipeline, saveModel } from 'modc';
 *   const model = loadModel('model.onnx');
 *   const s = analyzeDecoder(model);
 *   const plan = planRouting({ numLayers: s.layers.length, hiddenSize: s.hiddenSize, routers: { kind: 'all-pass' } });
 *   runPipeline(model, modPipeline({ plan }));
 *   saveModel(model, 'out.onnx');
 */
export { ModcError, UsageError, quote } from './errors.js';
export { loadModel, modelFromBytes } from './io/load.js';
export { checkOutputPath, saveModel, type SaveOptions, type SaveResult } from './io/save.js';
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
export { analyzeDecoder, extractDecoder, LayerByLayerRunner, summarizeStructure, formatLayerTable } from './analysis/index.js';
export type { DecoderStructure, LayerInfo, KvCacheSpec, SideInput, AttentionForm } from './analysis/types.js';
export { planRouting, parseLayerSpec, type RoutingPlan, type LayerPlan, type PlanRequest, type RoutedPart } from './routing-plan.js';
export { readRouterFile, loadRouterFile, writeRouterFile, type LayerRouter, type RouterFile, type RouterFileMetadata } from './routers.js';
export { readRoutingMetadata, type RoutingMetadata } from './routing-metadata.js';
export { subLayersOf, type SubLayer, type SubLayers } from './analysis/sub-layers.js';
export { ModSession, type Logits, type GenerateResult } from './runtime/session.js';
export { decoderIo, type DecoderIo } from './runtime/decoder-io.js';
export { ModReference } from './reference/mod-reference.js';
export { graphFingerprint, recordSource, readSource, checkCompiledFrom, SOURCE_METADATA_KEY } from './source-fingerprint.js';
export { modPipeline, type ModOptions } from '../passes/index.js';
export { evaluate, type EvalOptions, type EvalResult, type LayerEval } from './eval/index.js';
export { modelCosts, readCosts, type ModelCosts, type LayerCost } from './analysis/cost.js';
export { readDataset, loadDataset, loadTokenizer, type Dataset, type DatasetOptions } from './data/index.js';
export { calibrate, Calibrator, type CalibrateOptions, type CalibrationResult, type CalibrationReport } from './calibration/calibrate.js';
export { routerFileMetadata, writeCalibratedRouters } from './calibration/router-file.js';
