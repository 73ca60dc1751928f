import type { FileHandle } from 'node:fs/promises';
import { SYNC_READ_MAX, checkReadRange, readFully, readFullySync, type Source } from './source.js';

/**
 * A file that is read while it is being written: each region (a decompressed chunk) is filled
 * front to back by one writer, and a read waits until every byte it asks for has been written —
 * or is known to stay a hole: bytes outside every region (a left-out chunk), and the rest of a
 * region whose writer has finished. When writing fails, every read waiting or to come fails with
 * that error; an aborted run fails them with the abort's reason. `onWait` learns which regions a
 * read waits for, so that a writer not yet started can be started at once.
 */
export class GrowingFile {
  private readonly regions: { start: number; end: number; written: number; finished: boolean }[];
  private readonly waiters = new Set<{ start: number; end: number; resolve: () => void; reject: (err: unknown) => void }>();
  private failure: { err: unknown } | undefined;

  constructor(
    private readonly fh: FileHandle,
    regions: { start: number; length: number }[],
    signal: AbortSignal,
    private readonly onWait: (region: number) => void = () => {},
  ) {
    this.regions = regions.map((r) => ({ start: r.start, end: r.start + r.length, written: r.start, finished: false }));
    if (signal.aborted) this.fail(signal.reason);
    else signal.addEventListener('abort', () => this.fail(signal.reason), { once: true });
  }

  /** Region `i` now holds its bytes up to `upTo` (exclusive, absolute); zero runs may be holes. */
  advance(i: number, upTo: number): void {
    this.regions[i]!.written = upTo;
    this.wake();
  }

  /** Region `i` is complete: whatever it did not write stays a hole. */
  finish(i: number): void {
    this.regions[i]!.finished = true;
    this.wake();
  }

  fail(err: unknown): void {
    if (this.failure) return;
    this.failure = { err };
    for (const w of this.waiters) w.reject(err);
    this.waiters.clear();
  }

  /**
   * A Source over the first `size` bytes (the file must already be that long). Its readSync
   * serves reads of up to SYNC_READ_MAX bytes that are already written, on the calling thread: the
   * bytes were written moments ago, so they are in the page cache, where such a read costs a few
   * microseconds against tens for a round trip through libuv's thread pool, which the export of
   * tens of thousands of small files waited out one by one.
   */
  view(name: string, size: number): Source {
    const readNow = (position: number, length: number): Buffer => readFullySync(this.fh.fd, position, length, name);
    return {
      name,
      size,
      read: async (position, length) => {
        checkReadRange({ name, size }, position, length);
        await this.ready(position, position + length);
        return length <= SYNC_READ_MAX ? readNow(position, length) : readFully(this.fh, position, length, name);
      },
      readSync: (position, length) => {
        checkReadRange({ name, size }, position, length);
        if (length > SYNC_READ_MAX || this.failure || !this.covered(position, position + length)) return undefined;
        return readNow(position, length);
      },
      // The writer owns the handle.
      close: async () => {},
    };
  }

  /** Regions that do not hold [start, end) yet. */
  private missing(start: number, end: number): number[] {
    const out: number[] = [];
    this.regions.forEach((r, i) => {
      if (!r.finished && r.end > start && r.start < end && r.written < Math.min(end, r.end)) out.push(i);
    });
    return out;
  }

  private covered(start: number, end: number): boolean {
    return this.missing(start, end).length === 0;
  }

  private ready(start: number, end: number): Promise<void> {
    if (this.failure) return Promise.reject(this.failure.err);
    const missing = this.missing(start, end);
    if (missing.length === 0) return Promise.resolve();
    const waiting = new Promise<void>((resolve, reject) => this.waiters.add({ start, end, resolve, reject }));
    for (const i of missing) this.onWait(i);
    return waiting;
  }

  private wake(): void {
    for (const w of this.waiters) {
      if (this.covered(w.start, w.end)) {
        this.waiters.delete(w);
        w.resolve();
      }
    }
  }
}
