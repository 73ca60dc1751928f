import { Writable } from 'node:stream';
import { Worker } from 'node:worker_threads';

/**
 * The per-byte work of a file output — sha256 of the bytes and writing them to the file — in a
 * worker thread, so the main thread, which also reads the ext tree and builds the tar, only copies
 * each batch once. The worker is plain JavaScript run with `eval`: it then starts the same way from
 * dist/ and from the TypeScript sources the unit tests import.
 */
const WORKER = `
const { createHash } = require('node:crypto');
const { writeSync } = require('node:fs');
const { parentPort, workerData } = require('node:worker_threads');
const hash = createHash('sha256');
let position = workerData.position;
const ring = Buffer.from(workerData.ring);
let bytes = 0;
parentPort.on('message', (m) => {
  try {
    if (m === null) {
      parentPort.postMessage({ digest: 'sha256:' + hash.digest('hex'), bytes });
      return;
    }
    m = ring.subarray(m.at, m.at + m.length);
    hash.update(m);
    // pwrite may write less than asked.
    for (let done = 0; done < m.length; ) {
      const n = writeSync(workerData.fd, m, done, m.length - done, position);
      done += n;
      position += n;
    }
    bytes += m.length;
    parentPort.postMessage({ written: m.length });
  } catch (err) {
    parentPort.postMessage({ error: err.message, code: err.code });
  }
});
`;

type FromWorker = { written: number } | { digest: string; bytes: number } | { error: string; code?: string };

/** Bytes handed to the worker and not yet written: enough to keep it busy, bounded for the RSS. */
const RING = 4 << 20;
/** Bytes copied into the ring before they are handed over. */
const FLUSH = 256 << 10;

/**
 * Writes what it is given to `fd` from `position` on and hashes it; `digest` and `bytes` are set
 * once the stream has finished. Destroying it (an error, an abort) stops the worker; the caller
 * removes the file, as before.
 */
export class HashingFileWriter extends Writable {
  digest = '';
  bytes = 0;
  private readonly worker: Worker;
  /** Shared with the worker: the main thread copies into it, the worker hashes and writes from it. */
  private readonly ring = Buffer.from(new SharedArrayBuffer(RING));
  private sent = 0;
  private posted = 0;
  private acked = 0;
  private pending: { chunks: Buffer[]; callback: (error?: Error | null) => void } | undefined;
  private finished: ((error?: Error | null) => void) | undefined;
  private failure: Error | undefined;

  constructor(fd: number, position: number, private readonly onBytes?: (bytes: number) => void) {
    super({ highWaterMark: 1 << 20 });
    this.worker = new Worker(WORKER, {
      eval: true,
      workerData: { fd, position, ring: this.ring.buffer },
      // A small young generation is collected often, and with it the batches already written:
      // they would otherwise add tens of MiB to the peak RSS.
      resourceLimits: { maxYoungGenerationSizeMb: 1, maxOldGenerationSizeMb: 16 },
    });
    this.worker.on('message', (m: FromWorker) => {
      if ('written' in m) {
        this.acked += m.written;
        this.pump();
      } else if ('digest' in m) {
        this.digest = m.digest;
        this.bytes = m.bytes;
        this.release(this.finished);
      } else {
        this.fail(Object.assign(new Error(m.error), { code: m.code }));
      }
    });
    this.worker.on('error', (err) => this.fail(err));
    this.worker.on('exit', (code) => this.fail(new Error(`the output writer stopped (exit status ${code})`)));
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    this.send([chunk], callback);
  }

  override _writev(chunks: { chunk: Buffer }[], callback: (error?: Error | null) => void): void {
    this.send(chunks.map((c) => c.chunk), callback);
  }

  override _final(callback: (error?: Error | null) => void): void {
    if (this.failure) return callback(this.failure);
    this.finished = callback;
    this.flush();
    this.worker.postMessage(null);
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    this.failure ??= error ?? new Error('the output writer was closed');
    this.worker.terminate().then(() => callback(error), callback);
  }

  private send(chunks: Buffer[], callback: (error?: Error | null) => void): void {
    this.pending = { chunks, callback };
    this.pump();
  }

  /** Copy what is pending into the free part of the ring, as far as it goes; the acks resume it. */
  private pump(): void {
    const p = this.pending;
    if (!p) return;
    if (this.failure) {
      this.pending = undefined;
      return p.callback(this.failure);
    }
    while (p.chunks.length > 0) {
      const head = this.sent % RING;
      const room = Math.min(RING - (this.sent - this.acked), RING - head);
      if (room === 0) return this.flush();
      const chunk = p.chunks[0]!;
      const n = Math.min(room, chunk.length);
      chunk.copy(this.ring, head, 0, n);
      this.sent += n;
      if (n === chunk.length) p.chunks.shift();
      else p.chunks[0] = chunk.subarray(n);
      if (this.sent - this.posted >= FLUSH || this.sent % RING === 0) this.flush();
    }
    this.pending = undefined;
    this.onBytes?.(this.sent);
    p.callback();
  }

  /**
   * Hand the bytes copied since the last message to the worker. Batched: tar headers come 512
   * bytes at a time, and one message (one hash update, one pwrite) each would cost more than the data.
   */
  private flush(): void {
    if (this.sent === this.posted) return;
    this.worker.postMessage({ at: this.posted % RING, length: this.sent - this.posted });
    this.posted = this.sent;
  }

  private release(callback: ((error?: Error | null) => void) | undefined, error?: Error): void {
    if (callback === this.finished) this.finished = undefined;
    callback?.(error);
  }

  private fail(error: Error): void {
    if (this.failure) return;
    this.failure = error;
    if (this.pending) this.pump();
    else if (this.finished) this.release(this.finished, error);
    else this.destroy(error);
  }
}
