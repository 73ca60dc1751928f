import type { Cleanup } from './cleanup.js';

export type Engine = 'builtin' | 'host';

export const STAGES = ['fetch', 'extract', 'decompress', 'convert', 'map', 'export', 'import', 'upload', 'verify', 'register', 'push'] as const;
export type StageName = (typeof STAGES)[number];

/** Bytes a stage has moved, polled by the renderer for the live line and kept for the result. */
export class Progress {
  total: number | undefined;
  done = 0;
  add(n: number): void {
    this.done += n;
  }
}

/** What every stage gets: the run's signal, its cleanup stack, scratch space and a progress counter. */
export interface StageContext {
  readonly engine: Engine;
  readonly signal: AbortSignal;
  readonly cleanup: Cleanup;
  /** Scratch directory of this run (removed at the end unless --keep-workdir). */
  readonly workdir: string;
  readonly progress: Progress;
  /** A short note shown under the stage (e.g. which fallback was taken). */
  note(text: string): void;
}
