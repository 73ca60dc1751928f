import { readSync } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { InputError } from '../errors.js';

/**
 * A random-access, read-only byte source: a file, a window of another source (a partition),
 * or a decoded container (a VHD). Each format reader takes one and may return another, so
 * readers compose like etcher-sdk's sources.
 */
export interface Source {
  /** Name used in error messages, e.g. "disk.vhd" or "disk.vhd partition 1". */
  readonly name: string;
  /** Size in bytes. */
  readonly size: number;
  /**
   * Read exactly `length` bytes at `position`. Reading outside [0, size) throws an InputError
   * naming the source: a reader never trusts an on-disk offset.
   */
  read(position: number, length: number): Promise<Buffer>;
  /**
   * The same bytes at once, when this source can give them without waiting (a scratch file
   * written moments ago is in the page cache); undefined when it cannot, and `read` must be used.
   * Small reads are most of an export, and a promise and a trip through libuv's thread pool cost
   * far more than the copy they carry.
   */
  readSync?(position: number, length: number): Buffer | undefined;
  close(): Promise<void>;
}

function checkRange(src: { name: string; size: number }, position: number, length: number): void {
  if (!Number.isSafeInteger(position) || !Number.isSafeInteger(length) || position < 0 || length < 0 || position + length > src.size) {
    throw new InputError(src.name, `read of ${length} bytes at offset ${position} is outside the ${src.size}-byte image`);
  }
}

/** Largest read a source makes on the calling thread (readSync); larger ones go through `read`. */
export const SYNC_READ_MAX = 256 * 1024;

/** `length` bytes at `position` of an open file; a regular file may give them in several reads. */
export async function readFully(fh: FileHandle, position: number, length: number, name: string): Promise<Buffer> {
  const buf = Buffer.allocUnsafe(length);
  for (let done = 0; done < length; ) {
    const { bytesRead } = await fh.read(buf, done, length - done, position + done);
    if (bytesRead === 0) throw new InputError(name, `unexpected end of file at offset ${position + done}`);
    done += bytesRead;
  }
  return buf;
}

/** readFully on the calling thread. */
export function readFullySync(fd: number, position: number, length: number, name: string): Buffer {
  const buf = Buffer.allocUnsafe(length);
  for (let done = 0; done < length; ) {
    const n = readSync(fd, buf, done, length - done, position + done);
    if (n === 0) throw new InputError(name, `unexpected end of file at offset ${position + done}`);
    done += n;
  }
  return buf;
}

/**
 * A local file. Its readSync serves reads of up to SYNC_READ_MAX on the calling thread: a disk
 * image being converted is read mostly front to back, so the kernel's read-ahead has most of
 * these in the page cache, and where it has not, the export would have waited for the read
 * anyway. A raw disk's export from this tree took 10.2 s with every small read through libuv's
 * pool, 8.8 s with them here.
 */
export class FileSource implements Source {
  private constructor(
    readonly name: string,
    readonly size: number,
    private readonly fh: FileHandle,
  ) {}

  static async open(path: string, name = path): Promise<FileSource> {
    let fh: FileHandle;
    try {
      fh = await open(path, 'r');
    } catch (err) {
      throw new InputError(name, `cannot open: ${(err as Error).message}`, { cause: err });
    }
    const st = await fh.stat();
    return new FileSource(name, st.size, fh);
  }

  async read(position: number, length: number): Promise<Buffer> {
    checkRange(this, position, length);
    return readFully(this.fh, position, length, this.name);
  }

  readSync(position: number, length: number): Buffer | undefined {
    checkRange(this, position, length);
    return length <= SYNC_READ_MAX ? readFullySync(this.fh.fd, position, length, this.name) : undefined;
  }

  close(): Promise<void> {
    return this.fh.close();
  }
}

/** A window [offset, offset + size) of another source; closing it leaves the parent open. */
export class SliceSource implements Source {
  constructor(
    private readonly parent: Source,
    readonly offset: number,
    readonly size: number,
    readonly name: string = `${parent.name}@${offset}`,
  ) {
    if (offset < 0 || size < 0 || offset + size > parent.size) {
      throw new InputError(parent.name, `region of ${size} bytes at offset ${offset} lies outside the ${parent.size}-byte image`);
    }
  }

  async read(position: number, length: number): Promise<Buffer> {
    checkRange(this, position, length);
    return this.parent.read(this.offset + position, length);
  }

  readSync(position: number, length: number): Buffer | undefined {
    checkRange(this, position, length);
    return this.parent.readSync?.(this.offset + position, length);
  }

  async close(): Promise<void> {}
}

/** Exposed for sources implemented elsewhere (vhd, xva) so all report ranges alike. */
export { checkRange as checkReadRange };
