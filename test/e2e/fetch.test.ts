import { createReadStream } from 'node:fs';
import { mkdtemp, readdir, rm, stat } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { leftovers, runCli } from '../helpers/cli.js';
import { buildFixture, type FixtureInfo } from '../helpers/fixtures.js';

/**
 * fetch from an http URL on loopback: a download cut three times resumes with Range requests and
 * is verified; a second run uses the cache after re-verifying it; a wrong sha256 fails.
 */
let fixture: FixtureInfo;
let server: Server;
let base: string;
let dir: string;
let size: number;
let cutsLeft = 0;
const ranges: string[] = [];

beforeAll(async () => {
  fixture = await buildFixture();
  size = (await stat(fixture.iso)).size;
  dir = await mkdtemp('/tmp/e2e-fetch-');
  server = createServer((req, res) => {
    const range = req.headers.range;
    ranges.push(range ?? 'none');
    const m = range ? /^bytes=(\d+)-$/.exec(range) : null;
    const start = m ? Number(m[1]) : 0;
    res.writeHead(m ? 206 : 200, {
      'content-length': String(size - start),
      'accept-ranges': 'bytes',
      ...(m ? { 'content-range': `bytes ${start}-${size - 1}/${size}` } : {}),
    });
    const body = createReadStream(fixture.iso, { start });
    if (cutsLeft > 0) {
      cutsLeft--;
      // Cut the connection after about a quarter of what is left.
      let sent = 0;
      body.on('data', (chunk: Buffer | string) => {
        sent += chunk.length;
        if (sent > (size - start) / 4) {
          body.destroy();
          res.socket?.destroy();
        }
      });
    }
    body.pipe(res);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});

afterAll(async () => {
  await new Promise((r) => server?.close(r));
  await rm(dir, { recursive: true, force: true });
});

describe('convert from an http URL', () => {
  it('resumes a download cut three times, verifies it, then uses the cache', async () => {
    const sha = (await runCli(['inspect', fixture.iso, '--json', '--quiet'])).stdout;
    const sha256 = (JSON.parse(sha) as { source: { sha256: string } }).source.sha256;
    cutsLeft = 3;
    ranges.length = 0;
    const cache = join(dir, 'cache');
    const out = join(dir, 'root.tar');
    const args = ['convert', `${base}/ddk.iso`, '--sha256', sha256, '--cache-dir', cache, '--output', `rootfs:${out}`, '--workdir', join(dir, 'w')];
    const r = await runCli(args);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/download interrupted .*resuming/);
    expect(ranges[0]).toBe('none');
    expect(ranges.slice(1).every((h) => /^bytes=\d+-$/.test(h)), ranges.join(', ')).toBe(true);
    expect(ranges.length).toBe(4);
    await stat(out);

    ranges.length = 0;
    const again = await runCli(args);
    expect(again.code, again.stderr).toBe(0);
    expect(again.stderr).toMatch(/cached download, verified/);
    expect(ranges).toEqual([]);
    const files = await readdir(join(cache, 'downloads', (await readdir(join(cache, 'downloads')))[0]!));
    expect(files.filter((f) => f.endsWith('.partial'))).toEqual([]);
    expect(await leftovers(join(dir, 'w'))).toEqual([]);
  });

  it('a wrong --sha256 fails with one line and keeps nothing unverified', async () => {
    const cache = join(dir, 'cache2');
    const r = await runCli(['convert', `${base}/ddk.iso`, '--sha256', 'f'.repeat(64), '--cache-dir', cache, '--output', `rootfs:${join(dir, 'x.tar')}`, '--workdir', join(dir, 'w'), '--quiet']);
    expect(r.code).toBe(1);
    expect(r.stderr.trim()).toMatch(/^ddk2docker: http:\/\/127\.0\.0\.1:\d+\/ddk\.iso: sha256 mismatch/);
    const sub = await readdir(join(cache, 'downloads'));
    expect(await readdir(join(cache, 'downloads', sub[0]!))).not.toContain('ddk.iso');
    expect(await leftovers(join(dir, 'w'))).toEqual([]);
  });
});
