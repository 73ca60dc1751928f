import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { CancelledError, throwIfAborted } from '../errors.js';
import { Cleanup } from './cleanup.js';
import { runSteps, type RendererKind, type StageTiming, type Step } from './runner.js';
import type { Engine } from './stage.js';

export interface ScopeOptions {
  engine: Engine;
  workdir?: string;
  keepWorkdir?: boolean;
  renderer?: RendererKind;
  signal?: AbortSignal;
}

export interface Scope {
  /** Aborted by the caller's signal or by the first failing stage. */
  signal: AbortSignal;
  workdir: string;
}

/**
 * One run of stages in its own scratch directory, with one cleanup stack: whatever happens —
 * success, a failing stage, SIGINT — mounts, loop devices and scratch files are undone before
 * this returns, and the half-made image is removed unless the run succeeded.
 */
export async function runScoped(opts: ScopeOptions, build: (scope: Scope) => Step[]): Promise<{ stages: StageTiming[]; workdir: string }> {
  const controller = new AbortController();
  const onOuterAbort = () => controller.abort(new CancelledError());
  opts.signal?.addEventListener('abort', onOuterAbort, { once: true });
  if (opts.signal?.aborted) controller.abort(new CancelledError());

  const cleanup = new Cleanup();
  const parent = resolve(opts.workdir ?? tmpdir());
  await mkdir(parent, { recursive: true });
  const workdir = await mkdtemp(join(parent, 'ddk2docker-'));
  if (!opts.keepWorkdir) cleanup.defer(`remove ${workdir}`, () => rm(workdir, { recursive: true, force: true }));

  let failed = true;
  let firstError: unknown;
  const abort = (err: unknown) => {
    firstError ??= err;
    if (!controller.signal.aborted) controller.abort(err);
  };
  try {
    const steps = build({ signal: controller.signal, workdir });
    const stages = await runSteps(steps, { engine: opts.engine, signal: controller.signal, cleanup, workdir, abort }, opts.renderer ?? 'auto');
    // Interrupted while the last stage finished its work: the run still stops and is undone, as it said it would.
    throwIfAborted(controller.signal);
    failed = false;
    return { stages, workdir };
  } catch (err) {
    abort(err);
    throw opts.signal?.aborted ? new CancelledError() : (firstError ?? err);
  } finally {
    opts.signal?.removeEventListener('abort', onOuterAbort);
    const problems = await cleanup.run(failed);
    if (problems.length) process.stderr.write(`ddk2docker: cleanup: ${problems.join('; ')}\n`);
  }
}

/** Rejects when the run is aborted; marked handled, since it usually loses the race it is in. */
export function rejectOnAbort(signal: AbortSignal): Promise<never> {
  const p = new Promise<never>((_, reject) => {
    if (signal.aborted) reject(signal.reason);
    signal.addEventListener('abort', () => reject(signal.reason), { once: true });
  });
  p.catch(() => undefined);
  return p;
}

/** One abort listener per run, however many handoffs wait on it. */
const ABORTS = new WeakMap<AbortSignal, Promise<never>>();

/**
 * A value one stage hands to the stages after it when they run at once (decompress → convert →
 * map → export): `get` waits for it, and rejects as soon as the run is aborted.
 */
export class Handoff<T> {
  private resolve!: (value: T) => void;
  private readonly value = new Promise<T>((r) => (this.resolve = r));

  set(value: T): void {
    this.resolve(value);
  }

  get(signal: AbortSignal): Promise<T> {
    let aborted = ABORTS.get(signal);
    if (!aborted) ABORTS.set(signal, (aborted = rejectOnAbort(signal)));
    return Promise.race([this.value, aborted]);
  }
}
