import { availableParallelism } from 'node:os';
import { open, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import { InputError, namingFile } from '../errors.js';
import { GrowingFile } from '../formats/growing.js';
import { CHUNK_SIZE } from '../formats/xva.js';
import { tool, toolError } from '../host/exec.js';
import type { Chunk, Extracted } from './extract.js';
import { inflateChoice, isalInflater } from './inflate-isal.js';
import type { InflateIn, InflateJob, InflateOut } from './inflate-worker.js';
import type { StageContext } from './stage.js';

/** decompress: every chunk at N × 1e9 in one sparse scratch file; left-out chunks stay holes. */
export interface Decompressed {
  path: string;
  /** End of the last chunk's data: the length of the disk stream. */
  streamSize: number;
}

/**
 * Run `fn` over items, at most `limit` at a time; the first failure stops the rest. An abort stops
 * it too and rejects: items never started must not pass for done (a run failing in another stage
 * before any chunk started once left the disk's size unknown forever, and the process exited 0).
 */
async function pool<T>(items: T[], limit: number, signal: AbortSignal, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length && !signal.aborted) await fn(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  if (signal.aborted) throw signal.reason;
}

function checkChunkSize(size: number, isLast: boolean, input: string): void {
  if (size > CHUNK_SIZE) throw new InputError(input, `decompresses to ${size} bytes, more than the ${CHUNK_SIZE}-byte chunk size`);
  if (!isLast && size !== CHUNK_SIZE) throw new InputError(input, `decompresses to ${size} bytes; every chunk but the last must hold exactly ${CHUNK_SIZE}`);
}

/** At most this many compressed pieces of one chunk wait in the worker. */
const PIECES_IN_FLIGHT = 2;

/**
 * The gunzip worker of one run (see inflate-worker.ts): `chunk` gunzips one chunk into the
 * scratch file, the compressed pieces read here and handed over without a copy, and resolves
 * with its decompressed size; a bad gzip stream, an oversized chunk, the worker's end or an
 * abort fails it. `stop` ends the worker (also a cleanup step, before the file is closed).
 */
function inflater(ctx: StageContext, fh: FileHandle): { chunk: (chunk: Chunk, input: string, advance: (upTo: number) => void) => Promise<number>; stop: () => Promise<void> } {
  const job: InflateJob = { fd: fh.fd };
  const worker = new Worker(new URL('./inflate-worker.js', import.meta.url), {
    workerData: job,
    // A small young generation is collected often, and with it the dead buffers zlib wrote
    // from and to: they would otherwise add tens of MiB to the peak RSS.
    resourceLimits: { maxYoungGenerationSizeMb: 1, maxOldGenerationSizeMb: 32 },
  });
  const stop = ctx.cleanup.defer('stop the gunzip worker', async () => void (await worker.terminate()));
  const handlers = new Map<number, { reply: (m: InflateOut) => void; consumed: () => void; lost: (err: unknown) => void }>();
  let ended: unknown;
  worker.on('message', (m: InflateOut) => {
    const h = handlers.get(m.id);
    if (!h) return;
    if ('consumed' in m) h.consumed();
    else h.reply(m);
  });
  const lose = (err: unknown) => {
    ended ??= err;
    for (const h of handlers.values()) h.lost(ended);
  };
  worker.on('error', lose);
  worker.on('exit', (code) => lose(new Error(`the gunzip worker stopped (exit status ${code})`)));
  let nextId = 0;

  const chunk = async (c: Chunk, input: string, advance: (upTo: number) => void): Promise<number> => {
    const id = nextId++;
    const source = c.open();
    let inFlight = 0;
    let room: (() => void) | undefined;
    let settle!: { resolve: (n: number) => void; reject: (err: unknown) => void };
    const result = new Promise<number>((resolve, reject) => (settle = { resolve, reject }));
    let over = false;
    const finish = (err: unknown, size?: number) => {
      if (over) return;
      over = true;
      handlers.delete(id);
      room?.();
      source.destroy();
      if (err === undefined) settle.resolve(size!);
      else settle.reject(err);
    };
    handlers.set(id, {
      consumed: () => {
        inFlight--;
        room?.();
      },
      lost: (err) => finish(err),
      reply: (m) => {
        if ('upTo' in m) {
          advance(m.upTo);
          ctx.progress.add(m.bytes);
        } else if ('done' in m) finish(undefined, m.done);
        else if ('overflow' in m) finish(new InputError(input, `decompresses to more than the ${CHUNK_SIZE}-byte chunk size`));
        else if ('error' in m) {
          const gzip = (m.code ?? '').startsWith('Z_') || /unexpected end|incorrect header|invalid/i.test(m.error);
          finish(gzip ? new InputError(input, `corrupt gzip data: ${m.error}`) : Object.assign(new Error(m.error), { code: m.code }));
        }
      },
    });
    const onAbort = () => finish(ctx.signal.reason);
    ctx.signal.addEventListener('abort', onAbort, { once: true });
    if (ctx.signal.aborted) onAbort();
    if (ended !== undefined) finish(ended);
    const feed = async () => {
      worker.postMessage({ id, start: c.offset, limit: CHUNK_SIZE } satisfies InflateIn);
      for await (const piece of source as AsyncIterable<Buffer>) {
        if (over) return;
        // A piece that owns its whole memory moves to the worker; a slice of a shared pool is copied.
        const own = piece.byteOffset === 0 && piece.byteLength === piece.buffer.byteLength && piece.buffer instanceof ArrayBuffer;
        worker.postMessage({ id, piece } satisfies InflateIn, own ? [piece.buffer] : []);
        inFlight++;
        while (inFlight >= PIECES_IN_FLIGHT && !over) await new Promise<void>((r) => (room = r));
        room = undefined;
      }
      if (!over) worker.postMessage({ id, end: true } satisfies InflateIn);
    };
    if (!over) feed().catch((err: unknown) => finish(err));
    try {
      return await result;
    } finally {
      ctx.signal.removeEventListener('abort', onAbort);
    }
  };
  return { chunk, stop };
}

/** The manual recipe's way, but gap-correct: zcat into dd at the chunk's own offset. */
async function hostChunk(ctx: StageContext, disk: string, chunk: Chunk, input: string): Promise<number> {
  const zcat = chunk.path
    ? tool('zcat', [chunk.path], { signal: ctx.signal, buffer: { stdout: false } })
    : tool('zcat', [], { signal: ctx.signal, input: chunk.open(), buffer: { stdout: false } });
  const dd = tool('dd', [`of=${disk}`, 'bs=1M', 'iflag=fullblock', 'oflag=seek_bytes', `seek=${chunk.offset}`, 'conv=notrunc,sparse', 'status=progress'], {
    signal: ctx.signal,
    buffer: { stderr: false },
  });
  let reported = 0;
  let copied = -1;
  let ddSaid: string | undefined;
  const take = (line: string) => {
    if (line.startsWith('dd: ')) ddSaid ??= line;
    const m = /^(\d+) bytes/.exec(line);
    if (!m) return;
    const n = Number(m[1]);
    ctx.progress.add(n - reported);
    reported = n;
    copied = n;
  };
  // Whole lines only: dd's progress (ending in \r) and messages (\n) may arrive split across reads.
  let rest = '';
  dd.stderr?.on('data', (b: Buffer) => {
    const lines = (rest + b.toString('utf8')).split(/[\r\n]/);
    rest = lines.pop()!;
    lines.forEach(take);
  });
  try {
    await zcat.pipe(dd);
  } catch (err) {
    if (ctx.signal.aborted) throw toolError(err, 'zcat | dd');
    // gzip names the chunk by its path in our scratch mount: the input's name says it better.
    if ((err as { command?: string }).command?.startsWith('zcat')) throw new InputError(input, `corrupt gzip data: ${toolError(err, 'zcat').message.replace(/^zcat: (gzip: [^:]*: )?/, '')}`);
    // dd's stderr went to the progress parser: its own complaint (e.g. "No space left on device") was kept there.
    take(rest);
    throw new Error(`${disk}: ${ddSaid ?? toolError(err, 'dd').message}`, { cause: err });
  }
  take(rest);
  if (copied < 0) copied = 0;
  return copied;
}

/** The host engine's decompress: the scratch file is complete when this returns. */
export async function decompress(ctx: StageContext, extracted: Extracted, isoName: string): Promise<Decompressed> {
  const path = join(ctx.workdir, 'disk.img');
  const fh = await open(path, 'w+');
  ctx.cleanup.defer(`close ${path}`, () => fh.close().catch(() => undefined));
  const { chunks } = extracted;
  ctx.progress.total = chunks.length * CHUNK_SIZE;
  const last = chunks[chunks.length - 1]!;
  let streamSize = 0;
  await pool(chunks, availableParallelism(), ctx.signal, async (chunk) => {
    const input = `${isoName}:${extracted.chunkDir}/${chunk.name}`;
    const size = await hostChunk(ctx, path, chunk, input);
    checkChunkSize(size, chunk === last, input);
    if (chunk === last) ctx.progress.total = (chunks.length - 1) * CHUNK_SIZE + size;
    streamSize = Math.max(streamSize, chunk.offset + size);
  });
  // Trailing left-out chunks and zero runs were never written: give the file its full length.
  await fh.truncate(streamSize);
  return { path, streamSize };
}

/** The builtin engine's decompress, read while it runs (see GrowingFile). */
export interface Decompressing {
  path: string;
  file: GrowingFile;
  /** The stream's length, known once the last chunk is complete (it is decompressed first). */
  streamSize: Promise<number>;
  /** Settles when every chunk is written and checked; a failure has failed the file's readers too. */
  done: Promise<void>;
}

export async function startDecompress(ctx: StageContext, extracted: Extracted, isoName: string): Promise<Decompressing> {
  const path = join(ctx.workdir, 'disk.img');
  const fh = await open(path, 'w+');
  ctx.cleanup.defer(`close ${path}`, () => fh.close().catch(() => undefined));
  const { chunks } = extracted;
  const choice = inflateChoice();
  // ISA-L reads each chunk from the ISO file itself; zlib takes it from the chunk's stream.
  const gunzip = choice.kind === 'isal' && chunks.every((c) => c.location) ? isalInflater(ctx, fh, choice.addon) : inflater(ctx, fh);
  ctx.progress.total = chunks.length * CHUNK_SIZE;
  const last = chunks[chunks.length - 1]!;
  let sized!: (n: number) => void;
  const streamSize = new Promise<number>((r) => (sized = r));
  // The last chunk first: its end is the stream's end, which convert needs (a VHD footer sits
  // there); then in disk order, as many at once as there are cores. A chunk a reader waits for
  // starts at once, beyond that limit: a file system's metadata is spread over the whole disk.
  const order = [chunks.length - 1, ...chunks.keys()].filter((i, n, all) => all.indexOf(i) === n);
  const runs = new Map<number, Promise<void>>();
  let failFirst!: (err: unknown) => void;
  const failed = new Promise<never>((_, reject) => (failFirst = reject));
  const start = (i: number): Promise<void> => {
    if (runs.has(i)) return Promise.resolve();
    const run = decompressOne(i);
    run.catch(failFirst);
    runs.set(i, run);
    return run;
  };
  const file = new GrowingFile(fh, chunks.map((c) => ({ start: c.offset, length: CHUNK_SIZE })), ctx.signal, (i) => {
    if (!ctx.signal.aborted) void start(i);
  });
  const decompressOne = async (i: number): Promise<void> => {
    const chunk = chunks[i]!;
    const input = `${isoName}:${extracted.chunkDir}/${chunk.name}`;
    const size = await gunzip.chunk(chunk, input, (upTo) => file.advance(i, upTo));
    checkChunkSize(size, chunk === last, input);
    if (chunk === last) {
      ctx.progress.total = (chunks.length - 1) * CHUNK_SIZE + size;
      // Left-out chunks and zero runs were never written: give the file the stream's length.
      await fh.truncate(chunk.offset + size);
      sized(chunk.offset + size);
    }
    file.finish(i);
  };
  const all = pool(order, availableParallelism(), ctx.signal, start).then(() => Promise.all(runs.values()));
  const done = Promise.race([failed, all]).then(
    () => gunzip.stop(),
    async (err: unknown) => {
      const e = namingFile(err, path);
      file.fail(e);
      await gunzip.stop();
      throw e;
    },
  );
  // Whoever waits for the size learns of a failure before it from `done`.
  done.catch(() => undefined);
  return { path, file, streamSize: Promise.race([streamSize, done.then(() => streamSize)]), done };
}
