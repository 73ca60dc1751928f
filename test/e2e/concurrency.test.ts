import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { patch } from '../helpers/bytes.js';
import { leftovers, runCli, startCli, type CliResult } from '../helpers/cli.js';
import { buildMiniDdk, type MiniDdk } from '../helpers/faults.js';

/**
 * Conversions sharing one cache directory at once, from one URL on loopback: one download, which
 * the others wait for and then verify; an interrupted download handed over to the run that was
 * waiting; a cached download whose bytes changed on disk is caught by its sha256 and fetched again.
 */
let mini: MiniDdk;
let dir: string;
let work: string;
let server: Server;
let url: string;
let isoSha256: string;
let isoSize: number;
const requests: string[] = [];
/** Called once the server has sent this many bytes of one response. */
let onSent: { bytes: number; fire: () => void } | undefined;

interface ConvertJson {
  diffId: string;
  source: { sha256: string };
}

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** The one download directory under a cache dir, and its files. */
async function cacheFiles(cache: string): Promise<{ dir: string; files: string[] }> {
  const keys = await readdir(join(cache, 'downloads'));
  expect(keys).toHaveLength(1);
  const d = join(cache, 'downloads', keys[0]!);
  return { dir: d, files: (await readdir(d)).sort() };
}

/** The cache holds exactly the verified ISO and its recorded sha256: no partial file, no lock. */
async function expectIntactCache(cache: string): Promise<string> {
  const { dir: d, files } = await cacheFiles(cache);
  expect(files).toEqual(['ddk.iso', 'ddk.iso.sha256']);
  expect(sha256(await readFile(join(d, 'ddk.iso')))).toBe(isoSha256);
  expect((await readFile(join(d, 'ddk.iso.sha256'), 'utf8')).trim()).toBe(isoSha256);
  expect((await readdir(join(cache, 'downloads'))).filter((n) => n.endsWith('.lock'))).toEqual([]);
  return join(d, 'ddk.iso');
}

function converted(r: CliResult): ConvertJson {
  expect(r.code, r.stderr).toBe(0);
  const out = JSON.parse(r.stdout) as ConvertJson;
  expect(out.source.sha256).toBe(isoSha256);
  return out;
}

const convert = (cache: string, engine: string, name: string, extra: string[] = []) =>
  ['convert', url, '--engine', engine, '--cache-dir', cache, '--output', `rootfs:${join(dir, name)}`, '--workdir', work, '--json', ...extra];

beforeAll(async () => {
  dir = await mkdtemp('/tmp/e2e-conc-');
  work = await mkdtemp('/tmp/e2e-conc-work-');
  mini = await buildMiniDdk(join(dir, 'mini'));
  const iso = await readFile(mini.iso);
  isoSha256 = sha256(iso);
  isoSize = iso.length;
  // 32 KiB every 20 ms: the ISO takes about a second, long enough for a second run to find the
  // download under way.
  server = createServer((req, res) => {
    const m = /^bytes=(\d+)-$/.exec(req.headers.range ?? '');
    requests.push(req.headers.range ?? 'none');
    const start = m ? Number(m[1]) : 0;
    res.writeHead(m ? 206 : 200, { 'content-length': String(isoSize - start), ...(m ? { 'content-range': `bytes ${start}-${isoSize - 1}/${isoSize}` } : {}) });
    const body = createReadStream(mini.iso, { start, highWaterMark: 32 << 10 });
    let sent = 0;
    body.on('data', (chunk: Buffer | string) => {
      sent += chunk.length;
      if (onSent && sent >= onSent.bytes) {
        onSent.fire();
        onSent = undefined;
      }
      body.pause();
      setTimeout(() => body.resume(), 20);
    });
    body.pipe(res);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/ddk.iso`;
});

afterAll(async () => {
  await new Promise((r) => server?.close(r));
  await rm(dir, { recursive: true, force: true });
  await rm(work, { recursive: true, force: true });
});

describe('one cache directory, two conversions at once', () => {
  it('one download; the other run waits, verifies the cached file, and both engines make the same layer', async () => {
    const cache = join(dir, 'cache-both');
    requests.length = 0;
    const [a, b] = await Promise.all([runCli(convert(cache, 'builtin', 'both-a.tar')), runCli(convert(cache, 'host', 'both-b.tar'))]);
    const [ja, jb] = [converted(a), converted(b)];
    expect(ja.diffId).toBe(jb.diffId);
    expect(requests).toEqual(['none']);
    // Exactly one of them downloaded; the other found the verified file in the cache.
    expect([a.stderr, b.stderr].filter((s) => s.includes('cached download, verified'))).toHaveLength(1);
    await expectIntactCache(cache);
    expect(await leftovers(work)).toEqual([]);
  });

  it('the downloading run interrupted: the waiting run takes over and resumes where it stopped', async () => {
    const cache = join(dir, 'cache-handover');
    requests.length = 0;
    const first = startCli(convert(cache, 'builtin', 'handover-a.tar'));
    // The first run holds the download (its request reached the server) before the second starts.
    await new Promise<void>((resolve) => {
      onSent = { bytes: 128 << 10, fire: resolve };
    });
    const second = runCli(convert(cache, 'builtin', 'handover-b.tar'));
    await new Promise<void>((resolve) => {
      onSent = { bytes: 256 << 10, fire: resolve };
    });
    first.kill('SIGINT');
    const a = await first;
    expect(a.exitCode, String(a.stderr)).toBe(130);
    const jb = converted(await second);
    expect(jb.diffId).toMatch(/^sha256:[0-9a-f]{64}$/);
    expect(requests, requests.join(', ')).toHaveLength(2);
    expect(requests[0]).toBe('none');
    expect(Number(/^bytes=(\d+)-$/.exec(requests[1]!)?.[1])).toBeGreaterThan(0);
    await expectIntactCache(cache);
    expect(await stat(join(dir, 'handover-a.tar')).then(() => 'written', () => 'absent')).toBe('absent');
    expect(await leftovers(work)).toEqual([]);
  });
});

describe('a cached download changed on disk', () => {
  let cache: string;
  let diffId: string;

  beforeAll(async () => {
    cache = join(dir, 'cache-tamper');
    diffId = converted(await runCli(convert(cache, 'builtin', 'first.tar'))).diffId;
  });

  it.each([
    ['no --sha256: checked against the sha256 recorded at download', false, []],
    ['--sha256 given, the record rewritten to match the changed bytes', true, ['--sha256']],
  ] as const)('%s: refetched, converted as before', async (_name, forgeRecord, flags) => {
    const cached = await expectIntactCache(cache);
    await patch(cached, 40 * 2048, Buffer.from('tampered'));
    if (forgeRecord) await writeFile(`${cached}.sha256`, `${sha256(await readFile(cached))}\n`);
    requests.length = 0;
    const r = await runCli(convert(cache, 'builtin', 'again.tar', flags.length ? [...flags, isoSha256] : []));
    expect(r.stderr).toContain('cached download failed verification; downloading again');
    expect(converted(r).diffId).toBe(diffId);
    expect(requests).toEqual(['none']);
    await expectIntactCache(cache);
    expect(await leftovers(work)).toEqual([]);
  });
});
