import { randomBytes } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli, startCli, type CliResult } from '../helpers/cli.js';
import { startDockerd, type Dockerd } from '../helpers/dockerd.js';
import { buildFixture, type FixtureInfo } from '../helpers/fixtures.js';
import { startXapiStandin, type XapiStandin } from '../helpers/xapi-standin.js';

/**
 * `ddk2docker verify` (the image's layer against the disk's, from the daemon, a docker-archive and
 * an OCI layout) and the catalogue behind `ddk2docker ls`, against a private dockerd. Images that
 * differ are made for real: `docker import` of a layer with one file's bytes changed, and a
 * docker-archive patched in place.
 */

interface VerifyJson {
  equal: boolean;
  image: { ref: string; id?: string; layers: number };
  diffId: { disk: string; image: string; equal: boolean; read: string };
  labels: Record<string, { disk: string; image: string | null; equal: boolean; level: string }>;
  precision: string;
  ignored?: string;
  entries: number;
  differenceCount: number;
  differences: { path: string; field: string; disk: unknown; image: unknown }[];
}

interface ConvertJson {
  image: { id: string; tag: string | null } | null;
  path?: string;
  diffId: string;
  files: number;
  source: { name: string; sha256: string };
}

interface LsEntry {
  id: string;
  created: string;
  source: { name: string; sha256: string };
  ovaLabel?: string;
  release?: string;
  platform?: string;
  engine: string;
  output: string;
  image?: { id: string; tag: string | null };
  daemon?: string;
  path?: string;
  diffId: string;
  files: number;
  registeredVms: { vm: string; xapi: string; since: string }[];
  state: 'present' | 'gone' | 'unknown';
}

const TAG = 'ddk-verify:1';
/** A file of the fixture whose bytes the tampering tests change (one byte, same size). */
const TAMPERED = 'usr/share/ddk/README';

let dockerd: Dockerd;
let fixture: FixtureInfo;
let other: FixtureInfo;
let standin: XapiStandin;
let work: string;
let data: string;
let converted: ConvertJson;
let archive: string;
let ociDir: string;

const env = (extra: Record<string, string> = {}): Record<string, string> => ({ DOCKER_HOST: dockerd.host, DDK2DOCKER_DATA_DIR: data, ...extra });
const docker = async (...args: string[]) => String((await execa('docker', args, { env: { DOCKER_HOST: dockerd.host } })).stdout).trim();

async function convert(args: string[], extra: Record<string, string> = {}): Promise<ConvertJson> {
  const r = await runCli(['convert', fixture.iso, '--workdir', work, '--quiet', '--json', ...args], env(extra));
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as ConvertJson;
}

async function verify(image: string, source = fixture.iso): Promise<{ r: CliResult; json: VerifyJson }> {
  const r = await runCli(['verify', source, '--image', image, '--workdir', work, '--quiet', '--json'], env());
  expect(r.code === 0 || r.code === 1, r.stderr).toBe(true);
  expect(r.stderr).toBe('');
  return { r, json: JSON.parse(r.stdout) as VerifyJson };
}

async function ls(extra: Record<string, string> = {}): Promise<LsEntry[]> {
  const r = await runCli(['ls', '--json'], env(extra));
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as LsEntry[];
}

/** The layer as it was written (the OCI layout's uncompressed blob) in a file, with one byte of TAMPERED changed if asked. */
async function layerFile(tamper: boolean): Promise<string> {
  const blob = (digest: string) => join(ociDir, 'blobs', 'sha256', digest.slice(7));
  const index = JSON.parse(await readFile(join(ociDir, 'index.json'), 'utf8')) as { manifests: { digest: string }[] };
  const manifest = JSON.parse(await readFile(blob(index.manifests[0]!.digest), 'utf8')) as { layers: { digest: string }[] };
  const layer = await readFile(blob(manifest.layers[0]!.digest));
  const out = join(work, 'layer.tar');
  await writeFile(out, tamper ? await flipContent(layer) : layer);
  return out;
}

/** Change the first byte of TAMPERED's content where it lies in a tar: the tar stays valid. */
async function flipContent(tar: Buffer): Promise<Buffer> {
  const content = await readFile(join(fixture.dir, 'rootfs', TAMPERED));
  const at = tar.indexOf(content);
  expect(at).toBeGreaterThan(0);
  expect(tar.indexOf(content, at + 1)).toBe(-1);
  const copy = Buffer.from(tar);
  copy[at] = copy[at] === 0x41 ? 0x42 : 0x41;
  return copy;
}

/** `docker import` of a layer file with the given labels; returns the image id. The file is removed. */
async function importLayer(layer: string, labels: Record<string, string>): Promise<string> {
  const change = `LABEL ${Object.entries(labels).map(([k, v]) => `${JSON.stringify(k)}=${JSON.stringify(v)}`).join(' ')}`;
  try {
    return await docker('import', '--change', change, layer);
  } finally {
    await rm(layer);
  }
}

beforeAll(async () => {
  [dockerd, fixture, other] = await Promise.all([startDockerd(), buildFixture(), buildFixture({ payload: 'vhd-dynamic', fs: 'ext3', startSector: 63 })]);
  standin = await startXapiStandin();
  work = await mkdtemp('/tmp/e2e-verify-');
  data = await mkdtemp('/tmp/e2e-data-');
  archive = `${work}-image.tar`;
  ociDir = `${work}-oci`;
});

afterAll(async () => {
  await standin?.close();
  await dockerd?.stop();
  for (const p of [work, data, archive, ociDir]) if (p) await rm(p, { recursive: true, force: true });
});

describe('verify: equal images', () => {
  it('the daemon image, a docker-archive and an OCI layout all verify against their DDK', async () => {
    converted = await convert(['--tag', TAG]);
    const daemon = await verify(TAG);
    expect(daemon.r.code).toBe(0);
    expect(daemon.json).toMatchObject({
      equal: true,
      image: { ref: TAG, id: converted.image!.id, layers: 1 },
      diffId: { disk: converted.diffId, image: converted.diffId, equal: true, read: converted.diffId },
      precision: 'exact',
      entries: converted.files,
      differenceCount: 0,
      differences: [],
    });
    expect(daemon.json.labels['ddk2docker.source.sha256']).toEqual({ disk: converted.source.sha256, image: converted.source.sha256, equal: true, level: 'error' });
    expect(daemon.json.labels['ddk2docker.source.name']).toMatchObject({ equal: true, level: 'warning' });

    const human = await runCli(['verify', fixture.iso, '--image', TAG, '--workdir', work, '--quiet'], env());
    expect(human.code, human.stderr).toBe(0);
    expect(human.stdout).toBe(`ddk.iso vs ${TAG}: equal: ${converted.files} entries compared`);

    for (const output of [`docker-archive:${archive}`, `oci:${ociDir}`]) {
      const written = await convert(['--output', output, '--tag', TAG]);
      expect(written.diffId).toBe(converted.diffId);
      const file = await verify(output);
      expect(file.r.code, output).toBe(0);
      expect(file.json).toMatchObject({ equal: true, image: { ref: output, layers: 1 }, diffId: { equal: true, read: converted.diffId }, differenceCount: 0 });
      expect(file.json.image.id).toBeUndefined();
    }
    expect(await readdir(work)).toEqual([]);
  });
});

describe('verify: images that differ', () => {
  it('an image imported from a layer with one byte changed: exit 1, that file and field named', async () => {
    const labels = { 'ddk2docker.source.name': 'ddk.iso', 'ddk2docker.source.sha256': converted.source.sha256 };
    const id = await importLayer(await layerFile(true), labels);
    const { r, json } = await verify(id);
    expect(r.code).toBe(1);
    expect(json.equal).toBe(false);
    expect(json.diffId.equal).toBe(false);
    expect(json.diffId.disk).toBe(converted.diffId);
    expect(json.labels['ddk2docker.source.sha256']!.equal).toBe(true);
    expect(json.differenceCount).toBe(1);
    expect(json.differences).toEqual([{ path: TAMPERED, field: 'sha256', disk: expect.stringMatching(/^[0-9a-f]{64}$/), image: expect.stringMatching(/^[0-9a-f]{64}$/) }]);

    const human = await runCli(['verify', fixture.iso, '--image', id, '--workdir', work, '--quiet'], env());
    expect(human.code).toBe(1);
    const lines = human.stdout.trimEnd().split('\n');
    expect(lines[0]).toBe(`ddk.iso vs ${id}: different: ${converted.files} entries compared; diffID differs, 1 file difference`);
    expect(lines[1]).toMatch(/^ {2}diffID: disk sha256:[0-9a-f]{64}, image sha256:[0-9a-f]{64}$/);
    expect(lines[2]).toMatch(new RegExp(`^  ${TAMPERED}: sha256: disk [0-9a-f]{64}, image [0-9a-f]{64}$`));
    expect(lines).toHaveLength(3);

    // The same image, saying it added exactly that file (as the uname shim does): equal.
    const shimmed = await importLayer(await layerFile(true), { ...labels, 'ddk2docker.uname-shim': `/${TAMPERED}` });
    const s = await verify(shimmed);
    expect(s.r.code).toBe(0);
    expect(s.json).toMatchObject({ equal: true, ignored: TAMPERED, diffId: { equal: false }, differenceCount: 0 });
  });

  it('a docker-archive whose layer bytes were changed in place: exit 1, read digest differs from the config', async () => {
    const bad = join(work, 'bad.tar');
    await writeFile(bad, await flipContent(await readFile(archive)));
    const { r, json } = await verify(`docker-archive:${bad}`);
    await rm(bad);
    expect(r.code).toBe(1);
    // The config still names the disk's diffID; the bytes read back do not hash to it.
    expect(json.diffId).toMatchObject({ disk: converted.diffId, image: converted.diffId, equal: true });
    expect(json.diffId.read).not.toBe(converted.diffId);
    expect(json.precision).toBe('docker');
    expect(json.differences.map((d) => [d.path, d.field])).toEqual([[TAMPERED, 'sha256']]);
  });

  it('another DDK: the diffID and the source label differ', async () => {
    const { r, json } = await verify(TAG, other.iso);
    expect(r.code).toBe(1);
    expect(json.diffId.equal).toBe(false);
    expect(json.diffId.image).toBe(converted.diffId);
    expect(json.diffId.disk).not.toBe(converted.diffId);
    expect(json.labels['ddk2docker.source.sha256']).toMatchObject({ image: converted.source.sha256, equal: false, level: 'error' });
    expect(json.differenceCount).toBeGreaterThan(0);
    expect(json.differences.length).toBe(Math.min(json.differenceCount, 50));
  });

  it('labels: a wrong sha256 fails, a different name only warns', async () => {
    const wrongSha = await importLayer(await layerFile(false), { 'ddk2docker.source.name': 'ddk.iso', 'ddk2docker.source.sha256': '0'.repeat(64) });
    const a = await verify(wrongSha);
    expect(a.r.code).toBe(1);
    expect(a.json).toMatchObject({ equal: false, diffId: { equal: true }, differenceCount: 0 });
    expect(a.json.labels['ddk2docker.source.sha256']).toEqual({ disk: converted.source.sha256, image: '0'.repeat(64), equal: false, level: 'error' });
    const human = await runCli(['verify', fixture.iso, '--image', wrongSha, '--workdir', work, '--quiet'], env());
    expect(human.stdout).toContain(`  label ddk2docker.source.sha256: disk "${converted.source.sha256}", image "${'0'.repeat(64)}"`);

    const renamed = await importLayer(await layerFile(false), { 'ddk2docker.source.name': 'renamed.iso', 'ddk2docker.source.sha256': converted.source.sha256 });
    const b = await verify(renamed);
    expect(b.r.code).toBe(0);
    expect(b.json.equal).toBe(true);
    expect(b.json.labels['ddk2docker.source.name']).toEqual({ disk: 'ddk.iso', image: 'renamed.iso', equal: false, level: 'warning' });
  });

  it('an image that is not there: one line, exit 1, before any disk work', async () => {
    for (const [image, message] of [
      ['ddk-verify:none', /^ddk2docker: ddk-verify:none: no such image in the Docker daemon at unix:\/\//],
      [`oci:${work}/none`, /^ddk2docker: oci:\/.*\/none: cannot read index\.json: ENOENT/],
      [`docker-archive:${work}/none.tar`, /^ddk2docker: \/.*\/none\.tar: cannot read: ENOENT/],
    ] as const) {
      const r = await runCli(['verify', fixture.iso, '--image', image, '--workdir', work], env());
      expect(r.code).toBe(1);
      expect(r.stdout).toBe('');
      expect(r.stderr.split('\n').filter(Boolean)).toHaveLength(1);
      expect(r.stderr).toMatch(message);
    }
    expect(await readdir(work)).toEqual([]);
  });
});

describe('catalogue: ddk2docker ls', () => {
  it('lists the conversions above with their source, release, image or path, diffID and state', async () => {
    const entries = await ls();
    expect(entries.map((e) => e.output)).toEqual(['docker', `docker-archive:${archive}`, `oci:${ociDir}`]);
    const [inDaemon, asArchive] = entries as [LsEntry, LsEntry];
    for (const e of entries) {
      expect(e).toMatchObject({
        source: { name: 'ddk.iso', sha256: converted.source.sha256 },
        ovaLabel: fixture.label,
        release: fixture.redhatRelease,
        engine: 'builtin',
        diffId: converted.diffId,
        files: converted.files,
        registeredVms: [],
        state: 'present',
      });
      expect(Date.parse(e.created)).toBeGreaterThan(Date.now() - 3_600_000);
    }
    expect(inDaemon).toMatchObject({ image: { id: converted.image!.id, tag: TAG }, daemon: dockerd.host });
    expect(inDaemon.path).toBeUndefined();
    expect(asArchive).toMatchObject({ path: archive });
    expect(asArchive.image).toBeUndefined();

    const table = await runCli(['ls'], env());
    expect(table.code).toBe(0);
    const lines = table.stdout.trimEnd().split('\n');
    expect(lines).toHaveLength(4);
    expect(lines[0]).toMatch(/^CREATED +SOURCE +SHA256 +OVA LABEL +RELEASE +IMAGE \/ OUTPUT +DIFFID +STATE +REGISTERED VMS$/);
    expect(lines[1]).toContain(`${TAG} ${converted.image!.id.slice(7, 19)}`);
    expect(lines[2]).toContain(archive);
    // Aligned: every row has its STATE column where the header has it.
    const col = lines[0]!.indexOf('STATE');
    for (const l of lines.slice(1)) expect(l.slice(col, col + 7)).toBe('present');
  });

  it('a failed conversion adds nothing; two at once are both recorded', async () => {
    const before = await ls();
    const junk = join(work, 'junk.iso');
    await writeFile(junk, randomBytes(1 << 16));
    const failed = await runCli(['convert', junk, '--workdir', work, '--quiet'], env());
    await rm(junk);
    expect(failed.code).toBe(1);
    expect(await ls()).toEqual(before);

    const targets = [`${work}-a.tar`, `${work}-b.tar`];
    try {
      const runs = await Promise.all(targets.map((t) => startCli(['convert', fixture.iso, '--output', `docker-archive:${t}`, '--workdir', work, '--quiet'], env())));
      for (const r of runs) expect(r.exitCode, String(r.stderr)).toBe(0);
      const after = await ls();
      expect(after).toHaveLength(before.length + 2);
      expect(after.slice(0, before.length).map((e) => e.id)).toEqual(before.map((e) => e.id));
      expect(after.slice(before.length).map((e) => e.path).sort()).toEqual([...targets].sort());
    } finally {
      for (const t of targets) await rm(t, { force: true });
    }
    // The files are gone now, and ls says so.
    expect((await ls()).slice(before.length).map((e) => e.state)).toEqual(['gone', 'gone']);
  });

  it('a removed image is gone; without a daemon, daemon images are unknown and ls still works', async () => {
    const extra = await convert(['--tag', 'ddk-verify:extra']);
    await docker('rmi', 'ddk-verify:extra');
    const listed = await ls();
    expect(listed.find((e) => e.image?.id === extra.image!.id)?.state).toBe('gone');
    expect(listed.find((e) => e.image?.id === converted.image!.id)?.state).toBe('present');

    const offline = await ls({ DOCKER_HOST: `unix://${work}/no-daemon.sock` });
    expect(offline.filter((e) => e.image).map((e) => e.state)).toEqual(offline.filter((e) => e.image).map(() => 'unknown'));
    expect(offline.find((e) => e.output.startsWith('docker-archive:'))?.state).toBe('present');
  });

  it('convert --register-vm lists the VM on its image; deregister takes it off', async () => {
    const xapi = { XAPI_USER: standin.user, XAPI_PASSWORD: standin.password };
    const reg = await convert(['--tag', 'ddk-verify:reg', '--register-vm', standin.vmUuid, '--xapi', standin.url], xapi);
    const entry = (await ls()).find((e) => e.image?.id === reg.image!.id)!;
    expect(entry.registeredVms).toEqual([{ vm: standin.vmUuid, xapi: standin.url, since: expect.any(String) }]);
    expect(entry.registeredVms[0]!.since >= entry.created.slice(0, 19)).toBe(true);
    const table = await runCli(['ls'], env());
    expect(table.stdout.split('\n').find((l) => l.includes('ddk-verify:reg'))).toMatch(new RegExp(`${standin.vmUuid}$`));

    const dereg = await runCli(['deregister', '--vm', standin.vmUuid, '--xapi', standin.url], env(xapi));
    expect(dereg.code, dereg.stderr).toBe(0);
    expect((await ls()).every((e) => e.registeredVms.length === 0)).toBe(true);
  });

  it('a damaged catalogue: ls fails with one line naming it, a conversion still succeeds with a warning', async () => {
    const file = join(data, 'catalogue.json');
    const saved = await readFile(file);
    try {
      await writeFile(file, '{"version": 1, "conversions": [{}]}');
      const r = await runCli(['ls'], env());
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(new RegExp(`^ddk2docker: ${file}: not a ddk2docker catalogue \\(conversions\\.0\\.id: Required\\); fix or remove it$`));
      const out = join(work, 'warn.tar');
      const c = await runCli(['convert', fixture.iso, '--output', `docker-archive:${out}`, '--workdir', work, '--quiet'], env());
      await rm(out, { force: true });
      expect(c.code).toBe(0);
      expect(c.stderr).toMatch(/^ddk2docker: warning: the catalogue was not updated: .*catalogue\.json: not a ddk2docker catalogue/m);
    } finally {
      await writeFile(file, saved);
    }
  });
});
