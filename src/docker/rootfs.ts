import { mkdir, open, readdir, rename, rm, stat, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { Writable, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { constants as zlibConstants, createGzip } from 'node:zlib';
import { CancelledError, InputError, namingFile, throwIfAborted } from '../errors.js';
import { Digester } from '../stream-sha256.js';
import type { LibvirtLxcResult } from './libvirt.js';

/**
 * Writing the layer stream to a file, the one thing every file output does: the root file system
 * tarball is just that; docker-archive and OCI layouts wrap it. Also the write-to-a-temporary-
 * name-then-rename discipline they share.
 */

export interface WriteOptions {
  signal?: AbortSignal;
  /** Called with the number of uncompressed layer bytes read so far. */
  onProgress?: (bytes: number) => void;
  /** zlib level 0–9 for gzip outputs; default zlib's (6). */
  gzipLevel?: number;
}

export interface OutputResult {
  /** Absolute path of what was written. */
  path: string;
  /** sha256:… of the uncompressed layer tar. */
  diffId: string;
  /** Size of the uncompressed layer tar. */
  layerBytes: number;
  /** sha256:… of the layer as stored (equals diffId unless compressed). */
  layerDigest: string;
  /** Size of the layer as stored. */
  storedBytes: number;
  /** Digest of the image config (for rootfs, of the config the image would have; nothing is written). */
  configDigest: string;
  manifestDigest?: string;
  /** libvirt-lxc: the domain and what the tree could not keep. */
  libvirt?: LibvirtLxcResult;
}

export interface LayerWrite {
  diffId: string;
  layerBytes: number;
  digest: string;
  storedBytes: number;
}

/**
 * Positional writes from `position` on. Not FileHandle.createWriteStream: until that stream is
 * destroyed, which closes the handle, handle.close() never resolves; the archive writer needs
 * the handle after the layer, to patch its header and append the metadata.
 */
class FileWriter extends Writable {
  constructor(private readonly file: FileHandle, private position: number) {
    // Large batches: fewer, bigger pwritev calls for a multi-gigabyte stream.
    super({ highWaterMark: 1 << 20 });
  }
  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    this.writeAll([chunk]).then(() => callback(), callback);
  }
  override _writev(chunks: { chunk: Buffer }[], callback: (error?: Error | null) => void): void {
    this.writeAll(chunks.map((c) => c.chunk)).then(() => callback(), callback);
  }
  private async writeAll(buffers: Buffer[]): Promise<void> {
    // pwritev may write less than asked (at most IOV_MAX buffers, or a short write).
    while (buffers.length > 0) {
      let { bytesWritten } = await this.file.writev(buffers, this.position);
      this.position += bytesWritten;
      while (buffers.length > 0 && bytesWritten >= buffers[0]!.length) bytesWritten -= buffers.shift()!.length;
      if (bytesWritten > 0) buffers[0] = buffers[0]!.subarray(bytesWritten);
    }
  }
}

function cancelled(signal: AbortSignal | undefined, error: unknown): unknown {
  return signal?.aborted && !(error instanceof CancelledError) ? new CancelledError() : error;
}

/**
 * Stream `layer` into `file` from `position` on, gzip-compressed when `gzipLevel` is a number,
 * hashing the uncompressed bytes (diffID) and, when compressing, the stored bytes, in the same pass.
 */
export async function writeLayer(
  layer: Readable,
  file: FileHandle,
  position: number,
  opts: { gzipLevel?: number; signal?: AbortSignal; onProgress?: (bytes: number) => void },
): Promise<LayerWrite> {
  const diff = new Digester(opts.onProgress);
  const out = new FileWriter(file, position);
  try {
    if (opts.gzipLevel === undefined) {
      await pipeline(layer, diff, out, { signal: opts.signal });
      const digest = diff.digest();
      return { diffId: digest, layerBytes: diff.bytes, digest, storedBytes: diff.bytes };
    }
    const stored = new Digester();
    const gzip = createGzip({ level: opts.gzipLevel, chunkSize: 1 << 18 });
    await pipeline(layer, diff, gzip, stored, out, { signal: opts.signal });
    return { diffId: diff.digest(), layerBytes: diff.bytes, digest: stored.digest(), storedBytes: stored.bytes };
  } catch (e) {
    throw cancelled(opts.signal, e);
  }
}

export function checkGzipLevel(level: number | undefined): number {
  if (level === undefined) return zlibConstants.Z_DEFAULT_COMPRESSION;
  if (!Number.isInteger(level) || level < 0 || level > 9) throw new InputError('gzip level', `must be an integer from 0 to 9, not ${level}`);
  return level;
}

/**
 * Build an output at a temporary name beside `target` and rename it into place only when `write`
 * succeeds; on failure or abort the temporary is removed and an existing target is left as it was.
 * A directory target that exists must be empty or an OCI layout: it is replaced as a whole, and
 * must never be some unrelated directory the user mistyped.
 */
export async function replaceOnSuccess<T>(
  target: string,
  kind: 'file' | 'directory',
  signal: AbortSignal | undefined,
  write: (temp: string) => Promise<T>,
): Promise<T> {
  throwIfAborted(signal);
  const abs = resolve(target);
  const parent = dirname(abs);
  const parentStat = await stat(parent).catch(() => undefined);
  if (!parentStat?.isDirectory()) throw new InputError(target, `directory ${parent} does not exist`);
  const existing = await stat(abs).catch(() => undefined);
  if (existing) {
    if (kind === 'file' && existing.isDirectory()) throw new InputError(target, 'is a directory');
    if (kind === 'directory') {
      if (!existing.isDirectory()) throw new InputError(target, 'exists and is not a directory');
      const isLayout = await stat(join(abs, 'oci-layout')).then(() => true, () => false);
      if (!isLayout && (await readdir(abs)).length > 0) throw new InputError(target, 'exists and is not an OCI image layout; refusing to replace it');
    }
  }
  const temp = join(parent, `.${basename(abs)}.partial-${process.pid}`);
  await rm(temp, { recursive: true, force: true });
  try {
    if (kind === 'directory') await mkdir(temp);
    const result = await write(temp);
    throwIfAborted(signal);
    if (kind === 'file' || !existing) await rename(temp, abs);
    else await swapDirectory(temp, abs);
    return result;
  } catch (e) {
    await rm(temp, { recursive: true, force: true });
    throw cancelled(signal, namingFile(e, abs));
  }
}

/** rename(2) cannot replace a non-empty directory: move the old one aside, then drop it. */
async function swapDirectory(temp: string, abs: string): Promise<void> {
  const old = join(dirname(abs), `.${basename(abs)}.old-${process.pid}`);
  await rm(old, { recursive: true, force: true });
  await rename(abs, old);
  try {
    await rename(temp, abs);
  } catch (e) {
    await rename(old, abs);
    throw e;
  }
  await rm(old, { recursive: true, force: true });
}

/** `rootfs:FILE.tar[.gz]`: the layer tar itself, for OpenVZ template caches and LXC. */
export async function writeRootfs(layer: Readable, target: string, gzip: boolean, opts: WriteOptions): Promise<LayerWrite & { path: string }> {
  const gzipLevel = gzip ? checkGzipLevel(opts.gzipLevel) : undefined;
  const written = await replaceOnSuccess(target, 'file', opts.signal, async (temp) => {
    const file = await open(temp, 'w', 0o644);
    try {
      return await writeLayer(layer, file, 0, { gzipLevel, signal: opts.signal, onProgress: opts.onProgress });
    } finally {
      await file.close();
    }
  });
  return { ...written, path: resolve(target) };
}
