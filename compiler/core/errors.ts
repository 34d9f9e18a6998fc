/**
 * Errors a user can act on. The CLI prints `modc: <message>` on one line and exits with
 * `exitCode`; anything else escaping is a bug and gets a stack trace.
 */

/**
 * Control characters (newline, NUL, escape, ...) and Unicode line separators written as escapes,
 * so a name taken from a model can never break a one-line message or a terminal.
 */
export function escapeText(text: string): string {
  // eslint-disable-next-line no-control-regex
  return text.replace(/[\u0000-\u001f\u007f-\u009f\u2028\u2029]/g, (c) => {
    switch (c) {
      case '\n':
        return '\\n';
      case '\r':
        return '\\r';
      case '\t':
        return '\\t';
      case '\0':
        return '\\0';
      default:
        return `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`;
    }
  });
}

/** A name from a model, quoted for a message: `'name'`, with control characters escaped. */
export function quote(name: string): string {
  return `'${escapeText(name)}'`;
}

export class ModcError extends Error {
  constructor(
    message: string,
    readonly exitCode: 1 | 2 = 1,
  ) {
    // Messages are one line by contract; a name that slipped through unquoted cannot break that.
    super(escapeText(message));
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
