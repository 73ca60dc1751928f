import { access, constants } from 'node:fs/promises';
import { delimiter, join } from 'node:path';
import { execa, ExecaError, type Options, type ResultPromise } from 'execa';
import { CancelledError, EnvironmentError } from '../errors.js';

/** Credentials read from the environment: the tools have no use for them, so they never see them. */
const CREDENTIALS = new Set(['XAPI_USER', 'XAPI_PASSWORD', 'REGISTRY_USER', 'REGISTRY_PASSWORD']);

/** Run a tool with an argument array (never a shell string), tied to the run's abort signal. */
export function tool(file: string, args: readonly string[], options: Options & { signal?: AbortSignal } = {}): ResultPromise {
  const { signal, env, extendEnv, ...rest } = options;
  const all = { ...(extendEnv === false ? {} : process.env), ...env };
  const clean = Object.fromEntries(Object.entries(all).filter(([k]) => !CREDENTIALS.has(k)));
  return execa(file, args, { cancelSignal: signal, forceKillAfterDelay: 3000, stripFinalNewline: true, ...rest, env: clean, extendEnv: false });
}

/** Closing lines that say nothing about the problem: the line before them does. */
const TRAILERS = [/^tar: Exiting with failure status due to previous errors$/, /dmesg\(1\) may have more information/];

/** The last telling line of a tool's stderr (text, or bytes when run with encoding 'buffer'). */
function lastWords(stderr: unknown): string | undefined {
  const text = stderr instanceof Uint8Array ? Buffer.from(stderr).toString('utf8') : String(stderr ?? '');
  return text
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !TRAILERS.some((t) => t.test(l)))
    .pop();
}

/** Turn an execa failure into one line naming the tool and what it said. */
export function toolError(err: unknown, what: string): Error {
  if (err instanceof ExecaError) {
    if (err.isCanceled) return new CancelledError();
    if (err.code === 'ENOENT') return new EnvironmentError(`${what}: ${err.command.split(' ')[0]} is not installed`);
    return new Error(`${what}: ${lastWords(err.stderr) ?? err.shortMessage}`, { cause: err });
  }
  return err instanceof Error ? err : new Error(String(err));
}

/** Run a tool to completion and return its stdout, with errors made readable. */
export async function run(file: string, args: readonly string[], what: string, options: Options & { signal?: AbortSignal } = {}): Promise<string> {
  try {
    const r = await tool(file, args, options);
    return String(r.stdout ?? '');
  } catch (err) {
    throw toolError(err, what);
  }
}

/** The full path of a command found on PATH (plus the sbin directories tools live in), or undefined. */
export async function which(file: string): Promise<string | undefined> {
  const dirs = [...(process.env.PATH ?? '').split(delimiter), '/usr/local/sbin', '/usr/sbin', '/sbin'];
  for (const dir of dirs) {
    if (!dir) continue;
    const candidate = join(dir, file);
    try {
      await access(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not here; keep looking
    }
  }
  return undefined;
}
