import { createHash, randomBytes } from 'node:crypto';
import { readdir, readFile } from 'node:fs/promises';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { execa } from 'execa';
import { afterEach, describe, expect, it } from 'vitest';
import { Digester, sha256Choice, streamSha256 } from '../../src/stream-sha256.js';

/**
 * A stream's sha256 on the addon's thread (native/sha256-thread, built by npm install) and with
 * Node's crypto: both must give createHash's digest for any run of pieces, let the stream wait
 * when the thread falls behind, and neither hold the process open nor outlive close().
 */
const KINDS = ['thread', 'node'] as const;

afterEach(() => {
  delete process.env.DDK2DOCKER_SHA256;
});

function expected(pieces: Buffer[]): string {
  const h = createHash('sha256');
  for (const p of pieces) h.update(p);
  return `sha256:${h.digest('hex')}`;
}

/** Pieces as a layer tar gives them: 512-byte headers, small and large data, empty pieces. */
function pieces(): Buffer[] {
  const out: Buffer[] = [];
  for (let i = 0; i < 3000; i++) out.push(randomBytes(512), randomBytes((i * 7919) % 70_000), Buffer.alloc(0));
  out.push(randomBytes(16 << 20), Buffer.alloc(8 << 20, 0x5a));
  return out;
}

it('the sha256 addon is built here (npm install builds it)', () => {
  const choice = sha256Choice();
  expect(choice.kind === 'node' ? choice.why : choice.kind).toBe('thread');
});

it('DDK2DOCKER_SHA256 must name a kind', () => {
  process.env.DDK2DOCKER_SHA256 = 'fast';
  expect(() => sha256Choice()).toThrow('DDK2DOCKER_SHA256 must be thread or node, not "fast"');
});

describe.each(KINDS)('sha256 with %s', (kind) => {
  it('is createHash\'s digest of the pieces in order', async () => {
    process.env.DDK2DOCKER_SHA256 = kind;
    const all = pieces();
    const h = streamSha256();
    for (const p of all) h.update(p);
    expect(await h.digest()).toBe(expected(all));
    expect(await streamSha256().digest()).toBe(expected([]));
  });

  it('lets the stream wait while more than the given bytes are still to hash', async () => {
    process.env.DDK2DOCKER_SHA256 = kind;
    const all = pieces();
    const h = streamSha256();
    let waits = 0;
    for (const p of all) {
      h.update(p);
      const behind = h.settle(1 << 20);
      if (behind) {
        waits++;
        await behind;
        // Settled means at most half of the allowance is left: the next check does not wait.
        expect(h.settle(1 << 20)).toBeUndefined();
      }
    }
    // Node's crypto hashes as it is given the bytes: never behind.
    if (kind === 'node') expect(waits).toBe(0);
    else expect(waits).toBeGreaterThan(0);
    expect(await h.digest()).toBe(expected(all));
  });

  it('the Digester passes the bytes on unchanged and gives their digest at the end', async () => {
    process.env.DDK2DOCKER_SHA256 = kind;
    const all = pieces();
    const d = new Digester();
    const seen: Buffer[] = [];
    await pipeline(Readable.from(all), d, new Writable({ write: (c: Buffer, _e, cb) => (seen.push(c), cb()) }));
    expect(Buffer.concat(seen).equals(Buffer.concat(all))).toBe(true);
    expect(d.bytes).toBe(Buffer.concat(all).length);
    expect(d.digest()).toBe(expected(all));
  });

  it('a Digester destroyed midway lets go of its hash', async () => {
    process.env.DDK2DOCKER_SHA256 = kind;
    const d = new Digester();
    const source = new Readable({ read() {} });
    const done = pipeline(source, d, new Writable({ write: (_c, _e, cb) => cb() }));
    source.push(randomBytes(32 << 20));
    source.destroy(new Error('cut'));
    await expect(done).rejects.toThrow('cut');
    expect(() => d.digest()).toThrow('before the stream has ended');
  });
});

/** Threads of this process named by the addon. */
async function hashThreads(): Promise<number> {
  const tasks = await readdir('/proc/self/task');
  const names = await Promise.all(tasks.map((t) => readFile(`/proc/self/task/${t}/comm`, 'utf8').catch(() => '')));
  return names.filter((n) => n.trim() === 'sha256').length;
}

describe('the thread and the process', () => {
  it('a thread ends with its digest, not when the garbage collector gets to it', async () => {
    const before = await hashThreads();
    const hashes = Array.from({ length: 8 }, () => streamSha256());
    for (const h of hashes) h.update(Buffer.alloc(1 << 20));
    expect(await hashThreads()).toBe(before + 8);
    await Promise.all(hashes.map((h) => h.digest()));
    expect(await hashThreads()).toBe(before);
  });

  const run = (script: string) => execa(process.execPath, ['--input-type=module', '-e', script], { cwd: process.cwd(), timeout: 30_000, reject: false });
  const load = `const { streamSha256 } = await import(${JSON.stringify(new URL('../../dist/stream-sha256.js', import.meta.url).href)});`;

  it('a digest being computed keeps the process alive until it is there', async () => {
    const r = await run(`${load} const h = streamSha256(); const b = Buffer.alloc(256 << 20, 1); h.update(b); h.digest().then((d) => console.log(d));`);
    expect(r.exitCode, r.stderr).toBe(0);
    expect(r.stdout.trim()).toBe(expected([Buffer.alloc(256 << 20, 1)]));
  });

  it('a hash left open does not keep the process alive, and close() stops a busy thread', async () => {
    const r = await run(`${load} const a = streamSha256(); a.update(Buffer.alloc(1 << 20)); const b = streamSha256(); b.update(Buffer.alloc(512 << 20)); b.close(); console.log('end');`);
    expect(r.exitCode, r.stderr).toBe(0);
    expect(r.stdout.trim()).toBe('end');
  });
});
