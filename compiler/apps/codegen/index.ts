/** `modc codegen`'s library side: a model in, the source of its typed session wrapper out. */
import { basename } from 'node:path';
import type { Model } from '../../core/ir/model.js';
import { sessionContract } from './contract.js';
import { emitSession, type EmitOptions } from './emit-session.js';

export { sessionContract, type SessionContract, type TensorSignature } from './contract.js';
export { emitSession, type EmitOptions } from './emit-session.js';

/** The TypeScript source of a session wrapper for `model` (loaded from `path`). */
export function generateSession(model: Model, path: string, opts: EmitOptions = {}): string {
  return emitSession(sessionContract(model, basename(path)), opts);
}
