import { availableParallelism } from 'node:os';
import { open, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import { InputError, namingFile } from '../errors.js';
import { GrowingFile } from '../formats/growing.js';
import { CHUNK_SIZE } from '../formats/xva.js';
import { tool, toolError } from '../host/exec.js';
import type { Chunk, Extracted } from './extract.js';
import type { StageContext } from './stage.js';

/** decompress: every chunk at N × 1e9 in one sparse scratch file; left-out chunks stay holes. */
export interface Decompressed {
  path: string;
  /** End of the last chunk's data: the length of the disk stream. */
  streamSize: number;
}

const BLOCK = 4096;
const ZERO = Buffer.alloc(BLOCK);

/** Run `fn` over items, at most `limit` at a time; the first failure stops the rest. */
async function pool<T>(items: T[], limit: number, signal: AbortSignal, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length && !signal.aborted) await fn(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}

/**
 * A sink that writes at absolute offsets and skips all-zero 4 KiB blocks, so zeros inside a
 * chunk become holes too and no byte is written that the file would not already read back.
 */
function sparseWriter(fh: FileHandle, start: number, ctx: StageContext, written: { n: number }, advance: (upTo: number) => void, input: string): Writable {
  let pos = start;
  return new Writable({
    highWaterMark: 4 << 20,
    async write(chunk: Buffer, _enc, cb) {
      try {
        // Checked before writing: the next chunk's region is being read.
        if (written.n + chunk.length > CHUNK_SIZE) throw new InputError(input, `decompresses to more than the ${CHUNK_SIZE}-byte chunk size`);
        let runStart = -1;
        for (let off = 0; off < chunk.length; off += BLOCK) {
          const end = Math.min(off + BLOCK, chunk.length);
          const zero = chunk.compare(ZERO, 0, end - off, off, end) === 0;
          if (!zero && runStart === -1) runStart = off;
          if (zero && runStart !== -1) {
            await fh.write(chunk, runStart, off - runStart, pos + runStart);
            runStart = -1;
          }
        }
        if (runStart !== -1) await fh.write(chunk, runStart, chunk.length - runStart, pos + runStart);
        pos += chunk.length;
        written.n += chunk.length;
        advance(pos);
        ctx.progress.add(chunk.length);
        cb();
      } catch (err) {
        cb(err as Error);
      }
    },
  });
}

function checkChunkSize(size: number, isLast: boolean, input: string): void {
  if (size > CHUNK_SIZE) throw new InputError(input, `decompresses to ${size} bytes, more than the ${CHUNK_SIZE}-byte chunk size`);
  if (!isLast && size !== CHUNK_SIZE) throw new InputError(input, `decompresses to ${size} bytes; every chunk but the last must hold exactly ${CHUNK_SIZE}`);
}

async function builtinChunk(ctx: StageContext, fh: FileHandle, chunk: Chunk, input: string, advance: (upTo: number) => void): Promise<number> {
  const written = { n: 0 };
  try {
    await pipeline(chunk.open(), createGunzip({ chunkSize: 1 << 20 }), sparseWriter(fh, chunk.offset, ctx, written, advance, input), { signal: ctx.signal });
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? '';
    if (code.startsWith('Z_') || /unexpected end|incorrect header|invalid/i.test((err as Error).message)) {
      throw new InputError(input, `corrupt gzip data: ${(err as Error).message}`, { cause: err });
    }
    throw err;
  }
  return written.n;
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
  dd.stderr?.on('data', (b: Buffer) => {
    ddSaid = b.toString('utf8').split(/[\r\n]/).find((l) => l.startsWith('dd: ')) ?? ddSaid;
    for (const m of b.toString('latin1').matchAll(/(\d+) bytes/g)) {
      const n = Number(m[1]);
      ctx.progress.add(n - reported);
      reported = n;
      copied = n;
    }
  });
  try {
    await zcat.pipe(dd);
  } catch (err) {
    if (ctx.signal.aborted) throw toolError(err, 'zcat | dd');
    // gzip names the chunk by its path in our scratch mount: the input's name says it better.
    if ((err as { command?: string }).command?.startsWith('zcat')) throw new InputError(input, `corrupt gzip data: ${toolError(err, 'zcat').message.replace(/^zcat: (gzip: [^:]*: )?/, '')}`);
    // dd's stderr went to the progress parser: its own complaint (e.g. "No space left on device") was kept there.
    throw new Error(`${disk}: ${ddSaid ?? toolError(err, 'dd').message}`, { cause: err });
  }
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
    const size = await builtinChunk(ctx, fh, chunk, input, (upTo) => file.advance(i, upTo));
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
    () => undefined,
    (err: unknown) => {
      const e = namingFile(err, path);
      file.fail(e);
      throw e;
    },
  );
  // Whoever waits for the size learns of a failure before it from `done`.
  done.catch(() => undefined);
  return { path, file, streamSize: Promise.race([streamSize, done.then(() => streamSize)]), done };
}
