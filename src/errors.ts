/**
 * An error the user can act on: it names the input (a file, URL, device or image) and what is
 * wrong with it. The CLI prints `message` as the one line on stderr.
 */
export class InputError extends Error {
  readonly input: string;
  constructor(input: string, problem: string, options?: { cause?: unknown }) {
    super(`${printable(input)}: ${printable(problem)}`, options);
    this.name = 'InputError';
    this.input = printable(input);
  }
}

/**
 * Messages quote names and values from images: escape control characters so that one stays one
 * line on a terminal and image bytes cannot send escape sequences to it.
 */
export function printable(text: string): string {
  // eslint-disable-next-line no-control-regex
  return text.replace(/[\x00-\x08\x0a-\x1f\x7f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}

/**
 * A write that failed for want of space names the file: Node's write errors carry no path, and
 * "no space left on device" alone does not say which of scratch space or output is full.
 */
export function namingFile(err: unknown, path: string): unknown {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  if (code === 'ENOSPC') return new Error(`${path}: no space left on device`, { cause: err });
  if (code === 'EDQUOT') return new Error(`${path}: disk quota exceeded`, { cause: err });
  return err;
}

/** The run was interrupted (SIGINT/SIGTERM or an abort signal). */
export class CancelledError extends Error {
  constructor(reason = 'interrupted') {
    super(reason);
    this.name = 'CancelledError';
  }
}

/** A required external tool or facility is missing on this machine. */
export class EnvironmentError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'EnvironmentError';
  }
}

export function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new CancelledError();
}
