/**
 * Greedy agreement of a model with its dense original: after each held-out prefix, the original
 * greedily decodes N tokens; the model is fed the same ids (the prefix, then the original's
 * tokens one by one) and each of its N next-token argmaxes is compared with the original's token.
 * Agreement is the fraction that match: 1 for a model that decodes as the original does.
 */
import { ModcError } from '../../core/errors.js';
import { decoderIo } from '../../metadata/decoder-io.js';
import { loadModel } from '../../core/io/load.js';
import { genaiEmbeddingModel } from '../../runtime/embeddings.js';
import { argmax, lastPosition, ModSession } from '../../runtime/session.js';

export interface AgreementOptions {
  /** Tokens each row decodes after its prefix. */
  tokens: number;
  batchSize?: number;
  executionProvider?: 'cpu' | 'cuda';
  pad?: 'left' | 'right';
}

export interface AgreementResult {
  /** Tokens decoded per prefix, prefixes, and the fraction of (prefix, step) pairs where the model's argmax is the original's token. */
  tokens: number;
  prefixes: number;
  agreement: number;
  /** Fraction of prefixes whose N tokens all agree. */
  allAgree: number;
}

/**
 * Each sequence's prefix is all but its last N tokens (at least one token); the sequences must be
 * at most the model's context long (as eval splits them).
 */
export async function greedyAgreement(
  modelPath: string,
  originalPath: string,
  sequences: readonly number[][],
  opts: AgreementOptions,
): Promise<AgreementResult> {
  const N = opts.tokens;
  if (!(Number.isInteger(N) && N >= 1)) throw new ModcError(`the number of tokens to generate must be an integer >= 1, got ${N}`);
  const prefixes = sequences.map((s) => s.slice(0, Math.max(1, s.length - N)));
  const io = decoderIo(loadModel(modelPath));
  const maxPositions = io.maxPositions;
  const tooLong = prefixes.findIndex((p) => maxPositions !== null && p.length + N > maxPositions);
  if (tooLong >= 0) throw new ModcError(`sequence ${tooLong + 1}: its prefix and ${N} generated tokens exceed the model's ${maxPositions} positions`);
  const batch = io.unpaddable || io.batchOne ? 1 : Math.max(1, opts.batchSize ?? 8);
  const embeddingModel = io.inputsEmbeds ? genaiEmbeddingModel(modelPath) : null;
  if (io.inputsEmbeds && !embeddingModel)
    throw new ModcError(`${modelPath} takes inputs_embeds: --generate needs the embedding model that genai_config.json beside it names`);
  const sessionOpts = {
    executionProvider: opts.executionProvider,
    ...(embeddingModel ? { embeddings: { kind: 'model' as const, path: embeddingModel } } : {}),
  };
  const model = await ModSession.create(modelPath, sessionOpts);
  const dense = await ModSession.create(originalPath, sessionOpts);
  let agree = 0;
  let total = 0;
  let allAgree = 0;
  try {
    // Equal prefix lengths batch together (no padding needed for most data).
    const order = prefixes.map((_, i) => i).sort((a, b) => prefixes[b]!.length - prefixes[a]!.length);
    for (let at = 0; at < order.length; at += batch) {
      const rows = order.slice(at, at + batch).map((i) => prefixes[i]!);
      let d = dense.lastReal(await dense.forward(rows, { pad: opts.pad }));
      let m = model.lastReal(await model.forward(rows, { pad: opts.pad }));
      const ok = rows.map(() => true);
      for (let t = 0; t < N; t++) {
        const next = d.map(argmax);
        next.forEach((id, b) => {
          const same = argmax(m[b]!) === id;
          if (same) agree++;
          else ok[b] = false;
          total++;
        });
        if (t + 1 === N) break;
        d = lastPosition(await dense.step(next));
        m = lastPosition(await model.step(next));
      }
      allAgree += ok.filter(Boolean).length;
    }
  } finally {
    await model.session.release();
    await dense.session.release();
  }
  return { tokens: N, prefixes: prefixes.length, agreement: total ? agree / total : 1, allAgree: prefixes.length ? allAgree / prefixes.length : 1 };
}
