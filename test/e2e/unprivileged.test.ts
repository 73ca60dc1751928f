import { createReadStream } from 'node:fs';
import { chown, mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { createGunzip } from 'node:zlib';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { compareManifests, manifestFromTar, type Manifest } from '../../src/manifest.js';
import { CLI, leftovers } from '../helpers/cli.js';
import { startDockerd, type Dockerd } from '../helpers/dockerd.js';
import { buildFixture, rootOracleTar, type FixtureInfo } from '../helpers/fixtures.js';
import { manifestOfTarFile, savedLayerManifest } from '../helpers/images.js';

/**
 * The reason for the builtin engine: a CI job in an unprivileged container. Every output that
 * needs no daemon is made as uid 65534 with no capabilities at all, and holds the kernel's tree.
 */
const NOBODY = 65534;
let dockerd: Dockerd;
let fixture: FixtureInfo;
let oracle: Manifest;
let home: string;

function asNobody(args: string[]) {
  return execa(
    'setpriv',
    [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', '--inh-caps=-all', '--bounding-set=-all', '--no-new-privs', process.execPath, CLI, ...args],
    { reject: false, env: { HOME: home, PATH: process.env.PATH ?? '' }, extendEnv: false },
  );
}

beforeAll(async () => {
  dockerd = await startDockerd();
  fixture = await buildFixture();
  oracle = await manifestOfTarFile(await rootOracleTar(fixture));
  home = await mkdtemp('/tmp/e2e-nobody-');
  await chown(home, NOBODY, NOBODY);
});

afterAll(async () => {
  await dockerd?.stop();
  await rm(home, { recursive: true, force: true });
});

function expectSameTree(label: string, actual: Manifest, mtimePrecisionNs = 1n): void {
  const diffs = compareManifests(oracle, actual, { mtimePrecisionNs });
  expect(diffs, `${label}: ${diffs.slice(0, 20).join('\n')}`).toEqual([]);
}

describe('builtin engine as uid 65534 without capabilities', () => {
  it('cannot use the host engine, and says why', async () => {
    const r = await asNobody(['convert', fixture.iso, '--engine', 'host', '--output', `rootfs:${join(home, 'h.tar')}`, '--workdir', home, '--quiet']);
    expect(r.exitCode).toBe(1);
    expect(String(r.stderr).trim()).toMatch(/^ddk2docker: .*(not root|cannot)/);
    expect(await leftovers(home)).toEqual([]);
  });

  it.each([
    ['rootfs:root.tar', 'root.tar'],
    ['rootfs:root.tar.gz', 'root.tar.gz'],
  ])('--output %s holds the kernel tree to the nanosecond', async (_t, file) => {
    const out = join(home, file);
    const r = await asNobody(['convert', fixture.iso, '--output', `rootfs:${out}`, '--workdir', join(home, 'w'), '--json', '--quiet']);
    expect(String(r.stderr)).toBe('');
    expect(r.exitCode).toBe(0);
    const stream = file.endsWith('.gz') ? createReadStream(out).pipe(createGunzip()) : createReadStream(out);
    expectSameTree(file, await manifestFromTar(stream, out));
    expect(JSON.parse(String(r.stdout)).files).toBe(oracle.size);
    await rm(out);
    expect(await leftovers(join(home, 'w'))).toEqual([]);
  });

  it('--output docker-archive: `docker load` gives an image with the same tree', async () => {
    const out = join(home, 'image.tar');
    const r = await asNobody(['convert', fixture.iso, '--output', `docker-archive:${out}`, '--tag', 'ddk-nobody:1', '--change', 'CMD ["/bin/sh"]', '--workdir', join(home, 'w'), '--json', '--quiet']);
    expect(String(r.stderr)).toBe('');
    expect(r.exitCode).toBe(0);
    const result = JSON.parse(String(r.stdout)) as { diffId: string };
    await execa('docker', ['load', '-i', out], { env: { DOCKER_HOST: dockerd.host } });
    const inspect = JSON.parse(String((await execa('docker', ['image', 'inspect', 'ddk-nobody:1'], { env: { DOCKER_HOST: dockerd.host } })).stdout)) as { RootFS: { Layers: string[] }; Config: { Cmd: string[]; Labels: Record<string, string> } }[];
    expect(inspect[0]!.RootFS.Layers).toEqual([result.diffId]);
    expect(inspect[0]!.Config.Cmd).toEqual(['/bin/sh']);
    expect(inspect[0]!.Config.Labels['ddk2docker.source.name']).toBe('ddk.iso');
    expectSameTree('docker load', await savedLayerManifest(dockerd.host, 'ddk-nobody:1'), 1_000_000_000n);
    const run = await execa('docker', ['run', '--rm', '--network', 'none', 'ddk-nobody:1', '/bin/cat', '/etc/redhat-release'], { env: { DOCKER_HOST: dockerd.host } });
    expect(String(run.stdout)).toContain(fixture.redhatRelease);
    await rm(out);
  });

  it('--output oci: a valid OCI layout whose layer holds the tree', async () => {
    const out = join(home, 'oci');
    const r = await asNobody(['convert', fixture.iso, '--output', `oci:${out}`, '--tag', 'ddk-nobody:oci', '--workdir', join(home, 'w'), '--json', '--quiet']);
    expect(String(r.stderr)).toBe('');
    expect(r.exitCode).toBe(0);
    const result = JSON.parse(String(r.stdout)) as { diffId: string };
    const config = JSON.parse(String((await execa('skopeo', ['inspect', '--config', `oci:${out}:oci`])).stdout)) as { rootfs: { diff_ids: string[] } };
    expect(config.rootfs.diff_ids).toEqual([result.diffId]);
    const layer = join(out, 'blobs', 'sha256', result.diffId.slice('sha256:'.length));
    expectSameTree('oci layer', await manifestOfTarFile(layer));
    await rm(out, { recursive: true });
  });
});
