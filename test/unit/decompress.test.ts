import { createReadStream } from 'node:fs';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
// From the build, as the CLI runs it: the zlib gunzip runs dist/pipeline/inflate-worker.js in a
// worker thread, and the ISA-L addon is found beside dist/.
import { InputError } from '../../dist/errors.js';
import { CHUNK_SIZE } from '../../dist/formats/xva.js';
import { Cleanup } from '../../dist/pipeline/cleanup.js';
import { startDecompress } from '../../dist/pipeline/decompress.js';
import type { Chunk, ChunkLocation, Extracted } from '../../dist/pipeline/extract.js';
import { inflateChoice } from '../../dist/pipeline/inflate-isal.js';
import { Progress, type StageContext } from '../../dist/pipeline/stage.js';
import { readAt } from '../helpers/bytes.js';

/**
 * The builtin engine's decompress stage with each gunzip: ISA-L (the native addon, built by
 * npm install where libisal-dev is installed, as scripts/install does) and zlib in a worker.
 * Chunks are made by gzip(1); the scratch file must hold every chunk at its offset, zero blocks
 * as holes, and both gunzips must fail bad chunks with the same message.
 */
const INFLATERS = ['isal', 'zlib'] as const;

let tmp: string;
/** gzip of CHUNK_SIZE bytes: 4 KiB of text at 5 MB, zeros elsewhere (a full, mostly empty chunk). */
let fullChunk: string;
/** gzip of CHUNK_SIZE + 1 zero bytes: one byte too many for a chunk. */
let oversized: string;

async function gzipOf(name: string, data: Buffer, level = 6): Promise<string> {
  const path = join(tmp, name);
  await writeFile(path, (await execa('gzip', [`-${level}`, '-c', '-n'], { input: data, encoding: 'buffer' })).stdout);
  return path;
}

/** `gzip -c` of a shell pipeline's output, without holding it in memory. */
async function gzipOfStream(name: string, script: string): Promise<string> {
  const path = join(tmp, name);
  await execa('sh', ['-c', `${script} | gzip -1 -n -c > "$1"`, 'sh', path]);
  return path;
}

/** Text and zeros in 4 KiB pieces, so that some blocks are holes and some are not. */
function mixed(size: number, seed: number): Buffer {
  const b = Buffer.alloc(size);
  for (let off = 0; off < size; off += 4096) {
    if (((off / 4096) * 7 + seed) % 3 === 0) continue;
    b.write(`block ${off} seed ${seed} `.repeat(200), off, Math.min(4096, size - off), 'latin1');
  }
  return b;
}

beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ddk2docker-decompress-'));
  fullChunk = await gzipOfStream('full.gz', `{ head -c 5000000 /dev/zero; head -c 4096 /dev/urandom; head -c ${CHUNK_SIZE - 5004096} /dev/zero; }`);
  oversized = await gzipOfStream('oversized.gz', `head -c ${CHUNK_SIZE + 1} /dev/zero`);
}, 120_000);

afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

const saved = process.env.DDK2DOCKER_INFLATE;
afterEach(() => {
  if (saved === undefined) delete process.env.DDK2DOCKER_INFLATE;
  else process.env.DDK2DOCKER_INFLATE = saved;
});

function chunkFrom(index: number, path: string, size: number, location?: ChunkLocation): Chunk {
  return {
    index,
    name: `chunk-${String(index).padStart(9, '0')}.gz`,
    offset: index * CHUNK_SIZE,
    location: location ?? { path, extents: [{ offset: 0, length: size }] },
    open: () => createReadStream(path),
  };
}

async function chunks(...files: [number, string][]): Promise<Chunk[]> {
  return Promise.all(files.map(async ([i, p]) => chunkFrom(i, p, (await stat(p)).size)));
}

/** Run the stage over `chunks` into a fresh work dir; the scratch file's path and size, or the failure. */
async function decompress(which: (typeof INFLATERS)[number], list: Chunk[], abort?: (ctl: AbortController) => void): Promise<{ path: string; size: number; progress: number }> {
  process.env.DDK2DOCKER_INFLATE = which;
  const workdir = await mkdtemp(join(tmp, 'work-'));
  const cleanup = new Cleanup();
  const ctl = new AbortController();
  const progress = new Progress();
  const ctx: StageContext = { engine: 'builtin', signal: ctl.signal, cleanup, workdir, progress, note: () => {} };
  const extracted = { ova: undefined as never, chunkDir: 'ddk/xvda', chunks: list } satisfies Extracted;
  let failed = true;
  try {
    const d = await startDecompress(ctx, extracted, 'test.iso');
    d.streamSize.catch(() => undefined);
    abort?.(ctl);
    await d.done;
    const size = await d.streamSize;
    failed = false;
    return { path: d.path, size, progress: progress.done };
  } finally {
    expect(await cleanup.run(failed)).toEqual([]);
  }
}

it('the ISA-L addon is built here (scripts/install installs libisal-dev before npm install)', () => {
  delete process.env.DDK2DOCKER_INFLATE;
  const choice = inflateChoice();
  expect(choice.kind === 'zlib' ? choice.why : choice.kind).toBe('isal');
});

describe.each(INFLATERS)('gunzip with %s', (which) => {
  it('writes each chunk at its offset, a left-out chunk and zero blocks as holes', async () => {
    const last = mixed(3 << 20, 1);
    const lastGz = await gzipOf('last.gz', last);
    const r = await decompress(which, await chunks([0, fullChunk], [2, lastGz]));
    expect(r.size).toBe(2 * CHUNK_SIZE + last.length);
    expect((await stat(r.path)).size).toBe(r.size);
    expect(r.progress).toBe(CHUNK_SIZE + last.length);
    const at = (pos: number, n: number) => readAt(r.path, pos, n);
    expect((await at(5_000_000 - 1, 1))[0]).toBe(0);
    expect((await at(5_000_000, 4096)).equals(Buffer.alloc(4096))).toBe(false);
    expect((await at(2 * CHUNK_SIZE, last.length)).equals(last)).toBe(true);
    // Holes: chunk 1 is left out and chunk 0 is all zeros but one block; the last chunk is two thirds data.
    expect((await stat(r.path)).blocks * 512).toBeLessThan(4096 + last.length + (1 << 20));
  }, 60_000);

  it('reads gzip members one after another, zero bytes after a member as padding', async () => {
    const a = mixed(300_000, 2);
    const b = mixed(500_000, 3);
    const both = join(tmp, `members-${which}.gz`);
    await writeFile(both, Buffer.concat([await readFile(await gzipOf('a.gz', a)), await readFile(await gzipOf('b.gz', b, 1)), Buffer.alloc(1000)]));
    const r = await decompress(which, await chunks([0, both]));
    expect(r.size).toBe(a.length + b.length);
    expect((await readFile(r.path)).equals(Buffer.concat([a, b]))).toBe(true);
  });

  const bad: [string, (gz: Buffer) => Buffer, RegExp][] = [
    ['a wrong CRC-32', (gz) => { const c = Buffer.from(gz); c[c.length - 8]! ^= 0xff; return c; }, /corrupt gzip data: incorrect data check$/],
    ['a cut stream', (gz) => gz.subarray(0, gz.length >> 1), /corrupt gzip data: unexpected end of file$/],
    ['not gzip at all', (gz) => Buffer.concat([Buffer.from('PK\x03\x04'), gz]), /corrupt gzip data: incorrect header check$/],
    ['garbage after the member', (gz) => Buffer.concat([gz, Buffer.from('garbage')]), /corrupt gzip data: incorrect header check$/],
  ];
  it.each(bad)('fails a chunk with %s, naming it', async (name, damage, message) => {
    const gz = await readFile(await gzipOf('good.gz', mixed(200_000, 4)));
    const path = join(tmp, `${name.replace(/\W/g, '_')}-${which}.gz`);
    await writeFile(path, damage(gz));
    const err = await decompress(which, await chunks([0, path])).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(InputError);
    expect((err as Error).message).toMatch(/^test\.iso:ddk\/xvda\/chunk-000000000\.gz: /);
    expect((err as Error).message).toMatch(message);
  });

  it('fails a chunk that decompresses to more than the chunk size', async () => {
    const err = await decompress(which, await chunks([0, oversized])).catch((e: unknown) => e);
    expect((err as Error).message).toBe(`test.iso:ddk/xvda/chunk-000000000.gz: decompresses to more than the ${CHUNK_SIZE}-byte chunk size`);
  }, 60_000);

  it('stops on an abort, and lets go of the scratch file', async () => {
    const err = await decompress(which, await chunks([0, fullChunk]), (ctl) => setTimeout(() => ctl.abort(new Error('stop now')), 20)).catch((e: unknown) => e);
    expect((err as Error).message).toBe('stop now');
  }, 60_000);
});

describe('ISA-L reads the chunk where it lies', () => {
  it('across several extents of a file', async () => {
    const data = mixed(1 << 20, 5);
    const gz = await readFile(await gzipOf('split.gz', data));
    const cut = gz.length >> 1;
    // The gzip stream in two pieces with junk between and around them, as a multi-extent ISO file.
    const holder = join(tmp, 'holder.bin');
    await writeFile(holder, Buffer.concat([Buffer.from('junk'), gz.subarray(0, cut), Buffer.from('more junk'), gz.subarray(cut), Buffer.from('tail')]));
    const location = { path: holder, extents: [{ offset: 4, length: cut }, { offset: 4 + cut + 9, length: gz.length - cut }] };
    const r = await decompress('isal', [chunkFrom(0, holder, 0, location)]);
    expect((await readFile(r.path)).equals(data)).toBe(true);
  });

  it('a chunk whose file cannot be read fails naming the chunk', async () => {
    const missing = join(tmp, 'no-such.iso');
    const err = await decompress('isal', [chunkFrom(0, missing, 100)]).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(InputError);
    expect((err as Error).message).toBe(`test.iso:ddk/xvda/chunk-000000000.gz: cannot open ${missing}: No such file or directory`);
  });
});
