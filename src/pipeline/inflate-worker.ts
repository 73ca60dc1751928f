import { writeSync } from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import { createGunzip, type Gunzip } from 'node:zlib';

/**
 * The chunks' gunzip, off the main thread (see startDecompress): compressed pieces come in as
 * messages, the output goes to the shared scratch file at each chunk's offset, all-zero 4 KiB
 * blocks left as holes. zlib itself runs on libuv's pool, so one worker serves every chunk at
 * once, with one heap. The main thread only learns how far each chunk is written, so its event
 * loop and its garbage collector serve the readers of the disk, not zlib's output buffers.
 */
export interface InflateJob {
  /** The scratch file's descriptor, owned (and closed) by the main thread. */
  fd: number;
}

/** Main thread → worker, about chunk `id`: start it, a compressed piece, the end of its input. */
export type InflateIn = { id: number } & ({ start: number; limit: number } | { piece: Uint8Array } | { end: true });

/** Worker → main thread, about chunk `id`. */
export type InflateOut = { id: number } & (
  | { consumed: true }
  | { upTo: number; bytes: number }
  | { done: number }
  | { overflow: true }
  | { error: string; code?: string }
);

const BLOCK = 4096;
const ZERO = Buffer.alloc(BLOCK);

const port = parentPort!;
const { fd } = workerData as InflateJob;
const post = (m: InflateOut) => port.postMessage(m);

function writeAll(buf: Buffer, from: number, to: number, position: number): void {
  while (from < to) {
    const n = writeSync(fd, buf, from, to - from, position);
    from += n;
    position += n;
  }
}

/** Chunk `id`, written from absolute offset `start`, at most `limit` bytes. */
function inflate(id: number, start: number, limit: number): Gunzip {
  let pos = start;
  let total = 0;
  let failed = false;
  const gunzip = createGunzip({ chunkSize: 1 << 18 });
  const fail = (m: { overflow: true } | { error: string; code?: string }) => {
    failed = true;
    chunks.delete(id);
    post({ id, ...m });
    gunzip.destroy();
  };
  gunzip.on('data', (chunk: Buffer) => {
    if (failed) return;
    try {
      // Checked before writing: the next chunk's region is being read.
      if (total + chunk.length > limit) return fail({ overflow: true });
      let runStart = -1;
      for (let off = 0; off < chunk.length; off += BLOCK) {
        const end = Math.min(off + BLOCK, chunk.length);
        const zero = chunk.compare(ZERO, 0, end - off, off, end) === 0;
        if (!zero && runStart === -1) runStart = off;
        if (zero && runStart !== -1) {
          writeAll(chunk, runStart, off, pos + runStart);
          runStart = -1;
        }
      }
      if (runStart !== -1) writeAll(chunk, runStart, chunk.length, pos + runStart);
      pos += chunk.length;
      total += chunk.length;
      post({ id, upTo: pos, bytes: chunk.length });
    } catch (err) {
      fail({ error: (err as Error).message, code: (err as NodeJS.ErrnoException).code });
    }
  });
  gunzip.on('error', (err: NodeJS.ErrnoException) => {
    if (!failed) fail({ error: err.message, code: err.code });
  });
  gunzip.on('end', () => {
    chunks.delete(id);
    if (!failed) post({ id, done: total });
  });
  return gunzip;
}

const chunks = new Map<number, Gunzip>();

port.on('message', (m: InflateIn) => {
  if ('start' in m) {
    chunks.set(m.id, inflate(m.id, m.start, m.limit));
    return;
  }
  // A chunk that failed is gone: what was still on its way is dropped.
  const gunzip = chunks.get(m.id);
  if (!gunzip) return;
  if ('end' in m) gunzip.end();
  else gunzip.write(Buffer.from(m.piece.buffer, m.piece.byteOffset, m.piece.byteLength), () => post({ id: m.id, consumed: true }));
});
