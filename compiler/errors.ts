/**
 * Errors a user can act on. The CLI prints `modc: <message>` on one line and exits with
 * `exitCode`; anything else escaping is a bug and gets a stack trace.
 */
export class ModcError extends Error {
  constructor(message: string, readonly exitCode: 1 | 2 = 1) {
    super(message);
    this.name = 'ModcError';
  }
}

/** A bad command line: exit code 2. */
export class UsageError extends ModcError {
  constructor(message: string) {
    super(message, 2);
    this.name = 'UsageError';
  }
}
