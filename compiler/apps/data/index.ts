export { readDataset, loadDataset, type Dataset, type DatasetOptions } from './dataset.js';
export { loadTokenizer, tokenizerBeside, type TextTokenizer } from './tokenizer.js';
