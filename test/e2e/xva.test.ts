import { copyFile, mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { compareManifests, type Manifest } from '../../src/manifest.js';
import { patch } from '../helpers/bytes.js';
import { leftovers, runCli } from '../helpers/cli.js';
import { startDockerd, type Dockerd } from '../helpers/dockerd.js';
import { buildFixture, rootOracleTar, type FixtureInfo } from '../helpers/fixtures.js';
import { manifestOfTarFile, savedLayerManifest } from '../helpers/images.js';

/**
 * XVA version 2 input end to end: the default fixture's raw disk packed by scripts/make-xva (GNU
 * tar, sha1sum or XXH64, all-zero blocks left out, a keep-alive block that shifts every later block
 * number by one) converts with both engines to the tree of the kernel's loop mount, and to the same
 * layer, byte for byte, as the ISO carrying that disk.
 */

const MAKE_XVA = fileURLToPath(new URL('../../scripts/make-xva', import.meta.url));
const LABEL = 'XenServer DDK 6.5 (XVA)';

interface JsonResult {
  image: { id: string; tag: string | null } | null;
  diffId: string;
  files: number;
  source: { name: string; kind: string };
  xva: { vmName: string; vdi: string; virtualSize: number; blocks: number; leftOut: number; keepAlive: number; checksums: string[] };
  partition: { index: number };
  stages: { name: string }[];
}

let dockerd: Dockerd;
let work: string;
let fixture: FixtureInfo;
let oracle: Manifest;
let sha1Xva: string;
let xxhXva: string;
let isoDiffId: string;

async function makeXva(name: string, args: string[]): Promise<string> {
  const out = join(work, name);
  await execa(MAKE_XVA, ['--disk', fixture.disk, '--out', out, '--label', LABEL, ...args]);
  return out;
}

function expectSameTree(label: string, expected: Manifest, actual: Manifest, mtimePrecisionNs = 1n): void {
  const diffs = compareManifests(expected, actual, { mtimePrecisionNs });
  expect(diffs, `${label}: ${diffs.slice(0, 20).join('\n')}`).toEqual([]);
}

async function convert(source: string, args: string[], env: Record<string, string> = {}): Promise<JsonResult> {
  const r = await runCli(['convert', source, '--workdir', join(work, 'wd'), '--quiet', '--json', ...args], env);
  expect(r.stderr.split('\n').filter((l) => l.startsWith('ddk2docker:')), r.stderr).toEqual([]);
  expect(r.code).toBe(0);
  return JSON.parse(r.stdout) as JsonResult;
}

beforeAll(async () => {
  work = await mkdtemp('/tmp/e2e-xva-');
  await execa('mkdir', [join(work, 'wd')]);
  fixture = await buildFixture();
  oracle = await manifestOfTarFile(await rootOracleTar(fixture));
  sha1Xva = await makeXva('ddk.xva', ['--checksum', 'sha1', '--keep-alive']);
  xxhXva = await makeXva('ddk-xxhash.xva', ['--checksum', 'xxhash']);
  const out = join(work, 'iso.tar');
  isoDiffId = (await convert(fixture.iso, ['--output', `rootfs:${out}`])).diffId;
  await rm(out);
  dockerd = await startDockerd();
});

afterAll(async () => {
  await dockerd?.stop();
  await rm(work, { recursive: true, force: true });
});

describe('XVA version 2', () => {
  it('both engines write the kernel\'s tree, to the nanosecond, and the same layer as the ISO of the same disk', async () => {
    const diffIds: string[] = [];
    for (const engine of ['host', 'builtin']) {
      const out = join(work, `${engine}.tar`);
      const r = await convert(sha1Xva, ['--engine', engine, '--output', `rootfs:${out}`]);
      expect(r.source.kind).toBe('xva');
      expect(r.xva).toMatchObject({ vmName: LABEL, vdi: 'Ref:3', virtualSize: fixture.diskSize, keepAlive: 1, checksums: ['sha1'] });
      expect(r.xva.blocks + r.xva.leftOut).toBe(Math.ceil(fixture.diskSize / 2 ** 20));
      expect(r.partition.index).toBe(fixture.rootPartition);
      expect(r.stages.map((s) => s.name)).toEqual(['fetch', 'extract', 'decompress', 'convert', 'map', 'export', 'import', 'verify']);
      expectSameTree(`${engine} engine`, oracle, await manifestOfTarFile(out));
      diffIds.push(r.diffId);
      await rm(out);
    }
    expect(diffIds).toEqual([isoDiffId, isoDiffId]);
    expect(await leftovers(join(work, 'wd'))).toEqual([]);
  });

  it('imports into Docker from an .xva with XXH64 checksums (builtin engine)', async () => {
    const tag = 'ddk-e2e:xva';
    const r = await convert(xxhXva, ['--tag', tag], { DOCKER_HOST: dockerd.host });
    expect(r.image?.tag).toBe(tag);
    expect(r.diffId).toBe(isoDiffId);
    expect(r.xva.checksums).toEqual(['xxhash']);
    expectSameTree('docker save layer', oracle, await savedLayerManifest(dockerd.host, tag), 1_000_000_000n);
    const [image] = JSON.parse(String((await execa('docker', ['image', 'inspect', tag], { env: { DOCKER_HOST: dockerd.host } })).stdout)) as { Config: { Labels: Record<string, string> } }[];
    expect(image!.Config.Labels['ddk2docker.ova.label']).toBe(LABEL);
    expect(image!.Config.Labels['ddk2docker.source.name']).toBe('ddk-xxhash.xva');
  });

  it('inspect describes the .xva', async () => {
    const r = await runCli(['inspect', sha1Xva, '--workdir', join(work, 'wd')]);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(new RegExp(`^ddk\\.xva \\(xva, .*\\n  XVA version 2: ${LABEL.replace(/[().]/g, '\\$&')}, root disk Ref:3 of ${fixture.diskSize} bytes; \\d+ blocks of 1 MiB with sha1 checksums, \\d+ left out \\(all zeros\\), 1 keep-alive\\n  disk: raw, ${fixture.diskSize} bytes, mbr partition table\\n`));
    expect(r.stdout).toContain(fixture.redhatRelease);
  });

  it.each(['host', 'builtin'])('engine %s: a corrupt block fails the run, naming the .xva and the block, and leaves nothing behind', async (engine) => {
    const bad = join(work, 'bad.xva');
    await copyFile(sha1Xva, bad);
    // The first block after the keep-alive: GNU tar's listing says where its data starts.
    const { stdout } = await execa('tar', ['-tvR', '-f', bad]);
    const blocks = [...stdout.matchAll(/^block (\d+): \S+ \S+ +1048576 \S+ \S+ (Ref:3\/\d{8})$/gm)];
    const [, header, name] = blocks[3]!;
    await patch(bad, (Number(header) + 1) * 512 + 4096, Buffer.from('corrupt'));
    const r = await runCli(['convert', bad, '--engine', engine, '--output', `rootfs:${join(work, 'bad.tar')}`, '--workdir', join(work, 'wd')]);
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n').filter((l) => l.startsWith('ddk2docker:'))).toEqual([
      expect.stringMatching(new RegExp(`^ddk2docker: bad\\.xva:${name}: SHA-1 checksum mismatch: ${name}\\.checksum says [0-9a-f]{40}, the block's 1048576 bytes hash to [0-9a-f]{40}$`)),
    ]);
    expect(await leftovers(join(work, 'wd'))).toEqual([]);
    await rm(bad);
  });
});
