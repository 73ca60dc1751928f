import { randomBytes } from 'node:crypto';
import { cp, mkdtemp, readdir, rm, truncate, writeFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { leftovers, runCli, startCli } from '../helpers/cli.js';
import { startDockerd, type Dockerd } from '../helpers/dockerd.js';
import { buildFixture, type FixtureInfo } from '../helpers/fixtures.js';
import { imageIds } from '../helpers/images.js';

/**
 * Bad input and interruption: one clear line on stderr, a non-zero exit, and nothing left behind
 * (no mount, no loop device, no scratch file, no image) — for both engines.
 */
let dockerd: Dockerd;
let fixture: FixtureInfo;
let scratch: string;
let work: string;
const bad: Record<string, string> = {};

async function isoFrom(tree: string, out: string): Promise<void> {
  await execa('xorriso', ['-as', 'mkisofs', '-R', '-J', '-quiet', '-o', out, tree]);
}

beforeAll(async () => {
  dockerd = await startDockerd();
  fixture = await buildFixture();
  scratch = await mkdtemp('/tmp/e2e-bad-');
  work = await mkdtemp('/tmp/e2e-fwork-');

  bad.notIso = join(scratch, 'random.iso');
  await writeFile(bad.notIso, randomBytes(1 << 20));

  const noOva = join(scratch, 'no-ova');
  await cp(join(fixture.dir, 'iso'), noOva, { recursive: true });
  await rm(join(noOva, 'ddk', 'ova.xml'));
  bad.noOva = join(scratch, 'no-ova.iso');
  await isoFrom(noOva, bad.noOva);

  const cut = join(scratch, 'cut');
  await cp(join(fixture.dir, 'iso'), cut, { recursive: true });
  const chunkDir = join(cut, 'ddk', 'xvda');
  const last = (await readdir(chunkDir)).sort().pop()!;
  await truncate(join(chunkDir, last), Math.floor((await stat(join(chunkDir, last))).size / 2));
  bad.truncatedChunk = join(scratch, 'truncated-chunk.iso');
  await isoFrom(cut, bad.truncatedChunk);
});

afterAll(async () => {
  await dockerd?.stop();
  await rm(scratch, { recursive: true, force: true });
  await rm(work, { recursive: true, force: true });
});

const CASES: [string, () => string[], RegExp][] = [
  ['a missing file', () => [join(scratch, 'nope.iso')], /nope\.iso: no such file/],
  ['a file that is not an ISO', () => [bad.notIso!], /random\.iso: not a DDK ISO/],
  ['an ISO without ddk/ova.xml', () => [bad.noOva!], /no-ova\.iso: no ddk\/ova\.xml in the ISO/],
  ['a truncated chunk', () => [bad.truncatedChunk!], /chunk-0+3\.gz: corrupt gzip data/],
  ['a wrong --sha256', () => [fixture.iso, '--sha256', '0'.repeat(64)], /ddk\.iso: sha256 mismatch: expected 0{64}, got [0-9a-f]{64}/],
];

describe.each(['host', 'builtin'])('engine %s', (engine) => {
  it.each(CASES)('%s: one clear line, exit 1, nothing left', async (_name, args, message) => {
    const before = await imageIds(dockerd.host);
    const [source, ...rest] = args();
    const r = await runCli(['convert', source!, ...rest, '--engine', engine, '--tag', 'ddk-bad:1', '--workdir', work, '--quiet'], { DOCKER_HOST: dockerd.host });
    expect(r.code).toBe(1);
    const lines = r.stderr.split('\n').filter(Boolean);
    expect(lines, r.stderr).toHaveLength(1);
    expect(lines[0]).toMatch(/^ddk2docker: /);
    expect(lines[0]).toMatch(message);
    expect(r.stdout).toBe('');
    expect(await leftovers(work)).toEqual([]);
    expect(await imageIds(dockerd.host)).toEqual(before);
  });

  it('SIGINT during the export stage stops, cleans up and exits 130', async () => {
    const before = await imageIds(dockerd.host);
    const child = startCli(['convert', fixture.iso, '--engine', engine, '--tag', 'ddk-int:1', '--workdir', work], { DOCKER_HOST: dockerd.host });
    let log = '';
    let sent = false;
    child.stderr!.on('data', (b: Buffer) => {
      log += b.toString();
      if (!sent && log.includes('[STARTED] Export root file system\n')) {
        sent = true;
        child.kill('SIGINT');
      }
    });
    const r = await child;
    expect(sent, log).toBe(true);
    expect(log).not.toMatch(/\[COMPLETED\] Export root file system \(/);
    expect(r.exitCode, log).toBe(130);
    expect(log).toMatch(/ddk2docker: SIGINT: stopping and cleaning up/);
    expect(await leftovers(work), log).toEqual([]);
    expect(await imageIds(dockerd.host)).toEqual(before);
  });
});
