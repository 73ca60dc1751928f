/**
 * An error the user can act on: it names the input (a file, URL, device or image) and what is
 * wrong with it. The CLI prints `message` as the one line on stderr.
 */
export class InputError extends Error {
  readonly input: string;
  constructor(input: string, problem: string, options?: { cause?: unknown }) {
    super(`${input}: ${problem}`, options);
    this.name = 'InputError';
    this.input = input;
  }
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
