/** Every pass modc knows, by name: what `--passes` resolves against. */
import { PassRegistry } from '../compiler/pass-manager.js';
import { cleanupPass } from './cleanup.js';
import { liftConstantsPass } from './lift-constants.js';

export function defaultRegistry(): PassRegistry {
  return new PassRegistry().register(cleanupPass).register(liftConstantsPass);
}

export { cleanupPass, liftConstantsPass };
