/** Decoder analysis: find layers from dataflow, report them, cut the model into runnable units. */
export { analyzeDecoder, type AnalyzeOptions } from './analyze.js';
export { extractDecoder, perTokenInputs, type ExtractedDecoder, type LayerUnit, type RunnableUnit } from './extract.js';
export { formatExplanation, formatLayerTable, summarizeStructure, type LayerSummary, type SideInputSummary, type StructureSummary } from './report.js';
export type * from './types.js';
export { GraphFacts } from './graph-facts.js';
export { kvCompactionBlocker } from './attention.js';
export { weightMatMul, weightMatMuls, type WeightMatMul } from './weight-matmuls.js';
