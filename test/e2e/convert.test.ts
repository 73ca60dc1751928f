import { mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { compareManifests, type Manifest } from '../../src/manifest.js';
import { runCli, leftovers } from '../helpers/cli.js';
import { startDockerd, type Dockerd } from '../helpers/dockerd.js';
import { buildFixture, rootOracleTar, type FixtureInfo, type FixtureOptions } from '../helpers/fixtures.js';
import { exportedManifest, manifestOfTarFile, savedLayerManifest, asDockerExports } from '../helpers/images.js';

/**
 * The whole conversion, ISO to image in a real dockerd, for both engines and for raw and VHD
 * payloads. The kernel's read-only loop mount of the root partition (tarred by GNU tar) is the
 * oracle: the image's layer and a `docker export` of a container must hold the same tree.
 */
const FIXTURES: [string, FixtureOptions][] = [
  ['raw ext4, a left-out chunk inside the root', {}],
  ['dynamic VHD, ext3 at sector 63', { payload: 'vhd-dynamic', fs: 'ext3', startSector: 63 }],
  ['fixed VHD, ext4, a left-out chunk', { payload: 'vhd-fixed', gzipLevel: 1 }],
];

interface JsonResult {
  image: { id: string; tag: string | null } | null;
  output: string;
  diffId: string;
  files: number;
  bytes: number;
  engine: string;
  source: { name: string; sha256: string };
  ova: { label: string; vdiSize: number; chunks: number[] };
  partition: { index: number; offset: number };
  smoke?: string;
  stages: { name: string; seconds: number; bytes: number }[];
}

let dockerd: Dockerd;
let work: string;

beforeAll(async () => {
  dockerd = await startDockerd();
  work = await mkdtemp('/tmp/e2e-work-');
});

afterAll(async () => {
  await dockerd?.stop();
  await rm(work, { recursive: true, force: true });
});

/** Docker writes whole-second mtimes when it tars a layer back (save, export); our own tars keep nanoseconds. */
const DOCKER_MTIME = 1_000_000_000n;

function expectSameTree(label: string, expected: Manifest, actual: Manifest, mtimePrecisionNs = 1n): void {
  const diffs = compareManifests(expected, actual, { mtimePrecisionNs });
  expect(diffs, `${label}: ${diffs.slice(0, 20).join('\n')}`).toEqual([]);
}

describe.each(FIXTURES)('%s', (_name, options) => {
  let fixture: FixtureInfo;
  let oracle: Manifest;

  beforeAll(async () => {
    fixture = await buildFixture(options);
    oracle = await manifestOfTarFile(await rootOracleTar(fixture));
  });

  it.each(['host', 'builtin'] as const)('engine %s: the image holds exactly the root file system', async (engine) => {
    const tag = `ddk-e2e:${engine}-${fixture.payload}-${fixture.fs}`;
    // The test daemon runs vfs: the default smoke command is skipped there, an explicit one runs.
    const smoke = engine === 'host' ? ['--smoke', 'cat /etc/redhat-release'] : [];
    const r = await runCli(['convert', fixture.iso, '--engine', engine, '--tag', tag, '--workdir', work, '--json', '--label', 'purpose=e2e', '--change', 'CMD ["/bin/sh"]', ...smoke], { DOCKER_HOST: dockerd.host });
    expect(r.stderr.split('\n').filter((l) => l.startsWith('ddk2docker:')), r.stderr).toEqual([]);
    expect(r.code).toBe(0);
    const result = JSON.parse(r.stdout) as JsonResult;
    expect(result.image?.tag).toBe(tag);
    expect(result.engine).toBe(engine);
    expect(result.ova.chunks).toEqual(fixture.chunks);
    expect(result.ova.vdiSize).toBe(fixture.vdiSize);
    expect(result.partition.index).toBe(fixture.rootPartition);
    expect(result.files).toBe(oracle.size);
    if (engine === 'host') expect(result.smoke).toContain(fixture.redhatRelease);
    else {
      expect(result.smoke).toBeUndefined();
      expect(r.stderr).toContain('smoke skipped: vfs storage driver copies the whole layer per container; pass --smoke CMD to run one');
    }
    expect(result.stages.map((s) => s.name)).toEqual(['fetch', 'extract', 'decompress', 'convert', 'map', 'export', 'import', 'verify']);

    expectSameTree('docker save layer', oracle, await savedLayerManifest(dockerd.host, tag), DOCKER_MTIME);
    expectSameTree('docker export', asDockerExports(oracle), asDockerExports(await exportedManifest(dockerd.host, tag)), DOCKER_MTIME);
    expect(await leftovers(work)).toEqual([]);
  });

  it('both engines write the same tree as the kernel, to the nanosecond (rootfs output)', async () => {
    const trees: Manifest[] = [];
    const diffIds: string[] = [];
    // The builtin engine gunzips with ISA-L where its addon is built, else with zlib: both run here.
    for (const [engine, gunzip] of [['host', 'zlib'], ['builtin', 'isal'], ['builtin', 'zlib']]) {
      const out = join(work, `${engine}.tar`);
      const r = await runCli(['convert', fixture.iso, '--engine', engine!, '--output', `rootfs:${out}`, '--workdir', work, '--quiet', '--json'], { DDK2DOCKER_INFLATE: gunzip! });
      expect(r.stderr).toBe('');
      expect(r.code).toBe(0);
      diffIds.push((JSON.parse(r.stdout) as JsonResult).diffId);
      trees.push(await manifestOfTarFile(out));
      await rm(out);
    }
    // Byte-identical layers: the same diffID whichever engine or gunzip made it.
    expect(diffIds[1]).toBe(diffIds[0]);
    expect(diffIds[2]).toBe(diffIds[0]);
    expectSameTree('host engine', oracle, trees[0]!);
    expectSameTree('builtin engine', oracle, trees[1]!);
    expectSameTree('builtin vs host', trees[0]!, trees[1]!);
    expect(await leftovers(work)).toEqual([]);
  });
});
