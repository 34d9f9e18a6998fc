export { evaluate, type EvalOptions, type EvalResult, type LayerEval } from './evaluate.js';
export { exposeSelections, type Part, type Selection } from './selection.js';
