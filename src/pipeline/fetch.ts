import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { mkdir, rename, stat, writeFile, readFile, unlink } from 'node:fs/promises';
import { basename, join, resolve } from 'node:path';
import { Transform, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import lockfile from 'proper-lockfile';
import { CancelledError, InputError } from '../errors.js';
import { Digester } from '../stream-sha256.js';
import type { StageContext } from './stage.js';

/** fetch: a local path or an http(s) URL → a verified local file with its sha256. */
export interface FetchedSource {
  path: string;
  /** File name shown to users and put in labels. */
  name: string;
  sha256: string;
  size: number;
  url?: string;
}

export interface FetchOptions {
  sha256?: string;
  cacheDir: string;
  /** Attempts per download before giving up (each resumes where the last stopped). */
  retries?: number;
  /**
   * A local file is usable before its sha256 is known: this gets it (without the sha256) while the
   * hash is computed, so that reading it can start at once. Whatever it starts must not present a
   * result before fetchSource has returned: a mismatch fails the run.
   */
  whileHashing?: (file: Omit<FetchedSource, 'sha256'>) => Promise<void>;
}

export function isUrl(source: string): boolean {
  return /^https?:\/\//i.test(source);
}

export function normalizeSha256(hex: string): string {
  const h = hex.trim().toLowerCase().replace(/^sha256:/, '');
  if (!/^[0-9a-f]{64}$/.test(h)) throw new InputError('--sha256', `${JSON.stringify(hex)} is not a sha256 (64 hex digits)`);
  return h;
}

/** sha256 of a file, hashed as it is read (on the sha256 thread where there is one). */
async function sha256OfFile(path: string, ctx: StageContext): Promise<string> {
  const digester = new Digester((_total, added) => ctx.progress.add(added));
  await pipeline(createReadStream(path, { highWaterMark: 1 << 20 }), digester, new Writable({ write: (_c, _e, cb) => cb() }), { signal: ctx.signal });
  return digester.digest().slice('sha256:'.length);
}

function checkDigest(name: string, actual: string, expected: string | undefined): void {
  if (expected && actual !== expected) {
    throw new InputError(name, `sha256 mismatch: expected ${expected}, got ${actual}`);
  }
}

async function fetchLocal(ctx: StageContext, source: string, opts: FetchOptions): Promise<FetchedSource> {
  const path = resolve(source);
  let size: number;
  try {
    const st = await stat(path);
    if (!st.isFile()) throw new InputError(source, 'not a regular file');
    size = st.size;
  } catch (err) {
    if (err instanceof InputError) throw err;
    const code = (err as NodeJS.ErrnoException).code;
    throw new InputError(source, code === 'ENOENT' ? 'no such file' : (err as Error).message, { cause: err });
  }
  ctx.progress.total = size;
  const hashing = sha256OfFile(path, ctx);
  if (opts.whileHashing) {
    hashing.catch(() => undefined);
    await opts.whileHashing({ path, name: basename(path), size });
  }
  const sha256 = await hashing;
  checkDigest(source, sha256, opts.sha256 && normalizeSha256(opts.sha256));
  return { path, name: basename(path), sha256, size };
}

/**
 * Download into the cache with resume: a cut transfer continues with a Range request from the
 * bytes already on disk. A finished download is re-verified before every use.
 */
async function fetchUrl(ctx: StageContext, url: string, opts: FetchOptions): Promise<FetchedSource> {
  const expected = opts.sha256 ? normalizeSha256(opts.sha256) : undefined;
  const key = createHash('sha256').update(url).digest('hex').slice(0, 32);
  const dir = join(opts.cacheDir, 'downloads', key);
  const name = decodeURIComponent(basename(new URL(url).pathname)) || 'download';
  const final = join(dir, name.replace(/[^A-Za-z0-9._-]/g, '_'));
  const partial = `${final}.partial`;
  const meta = `${final}.sha256`;
  await mkdir(dir, { recursive: true });
  // Two runs fetching the same URL share one download instead of corrupting it.
  const release = await lockfile.lock(dir, { retries: { retries: 600, minTimeout: 1000, maxTimeout: 1000 }, stale: 60_000, realpath: false });
  try {
    const cached = await stat(final).catch(() => undefined);
    if (cached) {
      ctx.progress.total = cached.size;
      const sha256 = await sha256OfFile(final, ctx);
      const recorded = (await readFile(meta, 'utf8').catch(() => '')).trim();
      if ((expected && sha256 === expected) || (!expected && sha256 === recorded)) {
        ctx.note('cached download, verified');
        return { path: final, name, sha256, size: cached.size, url };
      }
      ctx.note('cached download failed verification; downloading again');
      await unlink(final);
    }
    const retries = opts.retries ?? 5;
    let lastError: unknown;
    for (let attempt = 0; attempt <= retries; attempt++) {
      if (ctx.signal.aborted) throw new CancelledError();
      const have = (await stat(partial).catch(() => undefined))?.size ?? 0;
      try {
        await downloadOnce(ctx, url, partial, have);
        lastError = undefined;
        break;
      } catch (err) {
        if (ctx.signal.aborted) throw new CancelledError();
        if (err instanceof InputError) throw err;
        lastError = err;
        ctx.note(`download interrupted (${(err as Error).message}); resuming, attempt ${attempt + 2}`);
        await new Promise((r) => setTimeout(r, Math.min(500 * 2 ** attempt, 8000)));
      }
    }
    if (lastError) throw new InputError(url, `download failed after ${retries + 1} attempts: ${(lastError as Error).message}`, { cause: lastError });
    ctx.progress.done = 0;
    const size = (await stat(partial)).size;
    ctx.progress.total = size;
    const sha256 = await sha256OfFile(partial, ctx);
    if (expected && sha256 !== expected) {
      await unlink(partial);
      checkDigest(url, sha256, expected);
    }
    await writeFile(meta, `${sha256}\n`);
    await rename(partial, final);
    if (!expected) ctx.note(`no --sha256 given; recorded ${sha256} on first fetch`);
    return { path: final, name, sha256, size, url };
  } finally {
    await release();
  }
}

async function downloadOnce(ctx: StageContext, url: string, partial: string, have: number): Promise<void> {
  const { default: got } = await import('got');
  const request = got.stream(url, {
    headers: have > 0 ? { range: `bytes=${have}-` } : {},
    retry: { limit: 0 },
    timeout: { connect: 30_000, response: 60_000, socket: 60_000 },
    signal: ctx.signal,
  });
  let append = false;
  await new Promise<void>((resolveResponse, reject) => {
    request.once('response', (res: { statusCode: number; headers: Record<string, string | undefined> }) => {
      if (res.statusCode === 206) {
        append = true;
        const total = /\/(\d+)$/.exec(res.headers['content-range'] ?? '')?.[1];
        ctx.progress.total = total ? Number(total) : undefined;
        ctx.progress.done = have;
      } else {
        const len = res.headers['content-length'];
        ctx.progress.total = len ? Number(len) : undefined;
        ctx.progress.done = 0;
      }
      resolveResponse();
    });
    request.once('error', (err: Error & { response?: { statusCode: number } }) => {
      const code = err.response?.statusCode;
      if (code && code >= 400 && code < 500 && code !== 416 && code !== 408 && code !== 429) reject(new InputError(url, `HTTP ${code}`));
      else reject(err);
    });
  });
  const counter = new Transform({
    transform(chunk: Buffer, _e, cb) {
      ctx.progress.add(chunk.length);
      cb(null, chunk);
    },
  });
  await pipeline(request, counter, createWriteStream(partial, { flags: append ? 'a' : 'w' }), { signal: ctx.signal });
  const size = (await stat(partial)).size;
  if (ctx.progress.total !== undefined && size !== ctx.progress.total) throw new Error(`got ${size} of ${ctx.progress.total} bytes`);
}

export async function fetchSource(ctx: StageContext, source: string, opts: FetchOptions): Promise<FetchedSource> {
  return isUrl(source) ? fetchUrl(ctx, source, opts) : fetchLocal(ctx, source, opts);
}
