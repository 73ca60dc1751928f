import { createHash } from 'node:crypto';
import { Transform, type TransformCallback } from 'node:stream';
import { EnvironmentError } from './errors.js';
import { loadAddon, type Loaded } from './native.js';

/**
 * The sha256 of a stream as it passes (a layer's diffID, a blob's digest). Where the addon
 * native/sha256-thread is built, the bytes are hashed on a thread of its own while the main
 * thread goes on with the stream; else by Node's crypto, on the main thread.
 */
export interface StreamSha256 {
  /** Hash `chunk` after the pieces before it; it must not change until it is hashed. */
  update(chunk: Buffer): void;
  /** A promise while more than `bytes` are still to hash, settling once at most half of that is left. */
  settle(bytes: number): Promise<void> | undefined;
  /** `sha256:hex` of everything given, once it is hashed. */
  digest(): Promise<string>;
  /** Let go of the thread, if any; needed only when the stream stops before digest(). */
  close(): void;
}

interface NativeHasher {
  update(chunk: Buffer): number;
  wait(count: number): boolean;
  digest(): string;
  close(): void;
}

export interface Addon {
  create(onHashed: (hashed: number) => void): NativeHasher;
}

let loaded: Loaded<Addon> | undefined;

function addon(): Loaded<Addon> {
  loaded ??= loadAddon<Addon>('sha256-thread', 'sha256_thread', 'a C compiler and Node\'s headers');
  return loaded;
}

/** How a stream's sha256 is computed here. DDK2DOCKER_SHA256: `thread` or `node` to choose, unset for the thread where it loads. */
export function sha256Choice(): { kind: 'thread'; addon: Addon } | { kind: 'node'; why: string } {
  const wanted = process.env.DDK2DOCKER_SHA256;
  if (wanted !== undefined && wanted !== 'thread' && wanted !== 'node') throw new EnvironmentError(`DDK2DOCKER_SHA256 must be thread or node, not ${JSON.stringify(wanted)}`);
  if (wanted === 'node') return { kind: 'node', why: 'DDK2DOCKER_SHA256=node' };
  const a = addon();
  if ('addon' in a) return { kind: 'thread', addon: a.addon };
  if (wanted === 'thread') throw new EnvironmentError(`DDK2DOCKER_SHA256=thread: ${a.why}`);
  return { kind: 'node', why: a.why };
}

export function streamSha256(): StreamSha256 {
  const choice = sha256Choice();
  return choice.kind === 'thread' ? new ThreadSha256(choice.addon) : new NodeSha256();
}

class NodeSha256 implements StreamSha256 {
  private readonly hash = createHash('sha256');
  update(chunk: Buffer): void {
    this.hash.update(chunk);
  }
  settle(): undefined {
    return undefined;
  }
  digest(): Promise<string> {
    return Promise.resolve(`sha256:${this.hash.digest('hex')}`);
  }
  close(): void {}
}

const EMPTY = Buffer.alloc(0);

class ThreadSha256 implements StreamSha256 {
  private readonly native: NativeHasher;
  /** Pieces given and not yet known to be hashed, held[head…], so that their bytes stay alive. */
  private held: Buffer[] = [];
  private head = 0;
  /** The number of the piece held[head] (pieces are numbered from 0 as given). */
  private heldFrom = 0;
  private heldBytes = 0;
  private queued = 0;
  private waiter: { count: number; resolve: () => void } | undefined;

  constructor(addon: Addon) {
    this.native = addon.create((hashed) => {
      this.release(hashed);
      const w = this.waiter;
      if (w && hashed >= w.count) {
        this.waiter = undefined;
        w.resolve();
      }
    });
  }

  update(chunk: Buffer): void {
    if (chunk.length === 0) return;
    const hashed = this.native.update(chunk);
    this.held.push(chunk);
    this.heldBytes += chunk.length;
    this.queued++;
    this.release(hashed);
  }

  settle(bytes: number): Promise<void> | undefined {
    if (this.heldBytes <= bytes) return undefined;
    // The piece after which at most half of `bytes` is still to hash.
    let left = this.heldBytes;
    let count = this.heldFrom;
    for (let i = this.head; left > bytes / 2 && i < this.held.length; i++, count++) left -= this.held[i]!.length;
    return this.until(count);
  }

  async digest(): Promise<string> {
    await this.until(this.queued);
    const hex = this.native.digest();
    // The thread has nothing left to do: end it now rather than when the handle is collected.
    this.native.close();
    return `sha256:${hex}`;
  }

  close(): void {
    this.native.close();
    this.held = [];
    this.head = 0;
    this.waiter = undefined;
  }

  private until(count: number): Promise<void> | undefined {
    if (!this.native.wait(count)) {
      this.release(count);
      return undefined;
    }
    return new Promise((resolve) => (this.waiter = { count, resolve }));
  }

  private release(hashed: number): void {
    const n = hashed - this.heldFrom;
    if (n <= 0) return;
    for (let i = 0; i < n; i++) this.heldBytes -= this.held[this.head + i]!.length;
    this.held.fill(EMPTY, this.head, this.head + n);
    this.head += n;
    this.heldFrom = hashed;
    // Drop the released slots now and then, not on every piece (that would copy the array each time).
    if (this.head === this.held.length || this.head >= 4096) {
      this.held = this.held.slice(this.head);
      this.head = 0;
    }
  }
}

/** Bytes the hash may fall behind the stream before the stream waits for it. */
const HASH_LAG = 16 << 20;

/**
 * Passes bytes through, counting and (unless told not to) hashing them; digest() once the stream
 * has ended. `onBytes` gets the bytes so far and those just added, for callers that sum either.
 */
export class Digester extends Transform {
  private readonly hash: StreamSha256 | undefined;
  private result: string | undefined;
  bytes = 0;
  constructor(private readonly onBytes?: (total: number, added: number) => void, opts: { hash?: boolean; highWaterMark?: number } = {}) {
    // A deep buffer lets hashing run ahead while a write is in flight (~25% faster than 16 KiB).
    super({ highWaterMark: opts.highWaterMark ?? 1 << 20 });
    this.hash = opts.hash === false ? undefined : streamSha256();
  }
  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    // The chunk goes on at once; the hash, on its thread, reads it meanwhile.
    this.hash?.update(chunk);
    this.bytes += chunk.length;
    this.onBytes?.(this.bytes, chunk.length);
    this.push(chunk);
    const behind = this.hash?.settle(HASH_LAG);
    if (behind) behind.then(() => callback(), callback);
    else callback();
  }
  override _flush(callback: TransformCallback): void {
    if (!this.hash) return callback();
    this.hash.digest().then((d) => {
      this.result = d;
      callback();
    }, callback);
  }
  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    this.hash?.close();
    callback(error);
  }
  digest(): string {
    if (!this.hash) throw new Error('Digester: digest() asked of a Digester made without hashing');
    if (this.result === undefined) throw new Error('Digester: digest() before the stream has ended');
    return this.result;
  }
}
