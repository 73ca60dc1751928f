import { watch } from 'node:fs';
import { chmod, chown, mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { XMLParser } from 'fast-xml-parser';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { compareManifests, manifestFromTar, type Manifest, type ManifestEntry } from '../../src/manifest.js';
import { GNU_TAR_ARGS } from '../../src/pipeline/export.js';
import { CLI, leftovers, runCli, startCli } from '../helpers/cli.js';
import { buildFixture, rootOracleTar, type FixtureInfo } from '../helpers/fixtures.js';
import { manifestOfTarFile } from '../helpers/images.js';

/**
 * `--output libvirt-lxc:DIR`: DIR/rootfs must hold the kernel's tree (as GNU tar sees both), and
 * DIR/domain.xml must pass libvirt's own schema check; a refused, failed or interrupted run leaves
 * neither DIR nor DIR.partial-* behind. No daemon is involved.
 */
interface LibvirtJson {
  diffId: string;
  files: number;
  path: string;
  libvirt: { domainXml: string; rootfs: string; name: string; uuid: string; init: string; ownersPreserved: boolean; devicesSkipped: number; xattrsSkipped: number; warnings: string[] };
}

const NOBODY = 65534;
let fixture: FixtureInfo;
let oracle: Manifest;
/** Scratch space (--workdir), checked to be empty after each run. */
let work: string;
/** Where the outputs go. */
let out: string;

beforeAll(async () => {
  fixture = await buildFixture();
  oracle = await manifestOfTarFile(await rootOracleTar(fixture));
  work = await mkdtemp('/tmp/e2e-lxc-work-');
  out = await mkdtemp('/tmp/e2e-lxc-out-');
  // uid 65534 writes below it too.
  await chmod(out, 0o755);
});

afterAll(async () => {
  await rm(work, { recursive: true, force: true });
  await rm(out, { recursive: true, force: true });
});

/** The directory's tree as GNU tar archives it, with the flags the host engine exports with. */
async function treeManifest(dir: string): Promise<Manifest> {
  const tar = execa('tar', [...GNU_TAR_ARGS, '-C', dir, '-cf', '-', '.'], { encoding: 'buffer', buffer: false });
  const [m] = await Promise.all([manifestFromTar(tar.stdout, dir), tar]);
  return m;
}

function expectSameTree(label: string, expected: Manifest, actual: Manifest): void {
  const diffs = compareManifests(expected, actual, { includeRoot: true });
  expect(diffs, `${label}: ${diffs.slice(0, 20).join('\n')}`).toEqual([]);
}

async function validate(xml: string): Promise<void> {
  const r = await execa('virt-xml-validate', [xml, 'domain'], { reject: false, all: true });
  expect(r.exitCode, r.all).toBe(0);
  expect(r.all).toBe(`${xml} validates`);
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Xml = any;
function parseDomain(text: string): Xml {
  return (new XMLParser({ ignoreAttributes: false, attributeNamePrefix: '' }).parse(text) as Xml).domain;
}

/** Names beside `dir` that a run may have left: the directory itself or its temporaries. */
async function traces(parent: string): Promise<string[]> {
  return (await readdir(parent)).filter((n) => n === 'dom' || n.startsWith('dom.partial-'));
}

describe('as root', () => {
  const diffIds: string[] = [];

  it.each(['host', 'builtin'] as const)('engine %s: DIR/rootfs is the kernel tree to the nanosecond, domain.xml validates', async (engine) => {
    const parent = await mkdtemp(join(out, `${engine}-`));
    const dir = join(parent, 'dom');
    // An existing empty directory is as good as none.
    if (engine === 'builtin') await mkdir(dir);
    const r = await runCli(['convert', fixture.iso, '--engine', engine, '--output', `libvirt-lxc:${dir}`, '--tag', 'ddk-lxc:1', '--workdir', work, '--json', '--quiet']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const result = JSON.parse(r.stdout) as LibvirtJson;
    expect(result.path).toBe(dir);
    expect(result.files).toBe(oracle.size);
    expect(result.libvirt).toMatchObject({ domainXml: join(dir, 'domain.xml'), rootfs: join(dir, 'rootfs'), name: 'ddk-lxc-1', init: '/bin/sh', ownersPreserved: true, devicesSkipped: 0, xattrsSkipped: 0, warnings: [] });
    expect(await readdir(dir)).toEqual(['domain.xml', 'rootfs']);
    expect(await traces(parent)).toEqual(['dom']);

    expectSameTree(engine, oracle, await treeManifest(join(dir, 'rootfs')));

    await validate(join(dir, 'domain.xml'));
    const text = await readFile(join(dir, 'domain.xml'), 'utf8');
    const domain = parseDomain(text);
    expect(domain.type).toBe('lxc');
    expect(domain.name).toBe('ddk-lxc-1');
    expect(domain.uuid).toBe(result.libvirt.uuid);
    expect(domain.os.type).toEqual({ '#text': 'exe', arch: 'x86_64' });
    expect(domain.os.init).toBe('/bin/sh');
    expect(domain.devices.filesystem).toEqual({ type: 'mount', accessmode: 'passthrough', source: { dir: join(dir, 'rootfs') }, target: { dir: '/' } });
    expect(domain.devices.console).toEqual({ type: 'pty' });
    expect(domain.idmap).toBeUndefined();
    expect(domain.description).toContain(result.diffId);
    diffIds.push(result.diffId);
    expect(await leftovers(work)).toEqual([]);
    await rm(parent, { recursive: true });
  });

  it("both engines give one diffID, the rootfs: output's; a rerun into the same DIR gives the same domain.xml", async () => {
    expect(diffIds).toHaveLength(2);
    expect(diffIds[0]).toBe(diffIds[1]);
    const tarball = join(out, 'root.tar');
    const r = await runCli(['convert', fixture.iso, '--output', `rootfs:${tarball}`, '--workdir', work, '--json', '--quiet']);
    expect(r.code).toBe(0);
    expect((JSON.parse(r.stdout) as LibvirtJson).diffId).toBe(diffIds[0]);
    await rm(tarball);

    const xmlOf = async (name: string): Promise<string> => {
      const dir = join(out, name);
      const run = await runCli(['convert', fixture.iso, '--output', `libvirt-lxc:${dir}`, '--tag', 'ddk-lxc:1', '--workdir', work, '--quiet']);
      expect(run.code, run.stderr).toBe(0);
      expect(run.stdout).toContain(`\ndomain ddk-lxc-1: ${join(dir, 'domain.xml')} (boots /bin/sh;`);
      const text = await readFile(join(dir, 'domain.xml'), 'utf8');
      await rm(dir, { recursive: true });
      return text;
    };
    const first = await xmlOf('dom');
    expect(await xmlOf('dom')).toBe(first);
  });

  it('a DIR that is not empty is refused, named, and left alone', async () => {
    const parent = await mkdtemp(join(out, 'full-'));
    const dir = join(parent, 'dom');
    await mkdir(dir);
    await writeFile(join(dir, 'mine'), 'precious\n');
    const r = await runCli(['convert', fixture.iso, '--output', `libvirt-lxc:${dir}`, '--workdir', work, '--quiet']);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(`ddk2docker: ${dir}: exists and is not empty; refusing to write into it`);
    expect(await readdir(dir)).toEqual(['mine']);
    expect(await traces(parent)).toEqual(['dom']);
    await rm(parent, { recursive: true });
  });

  it('a write that fails half way (file system full) leaves no DIR and no DIR.partial-*', async () => {
    const small = await mkdtemp(join(out, 'small-'));
    // Smaller than the tree: the write fails in the middle of the layer.
    await execa('mount', ['-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', small]);
    try {
      const r = await runCli(['convert', fixture.iso, '--output', `libvirt-lxc:${join(small, 'dom')}`, '--workdir', work, '--quiet']);
      expect(r.code).toBe(1);
      const lines = r.stderr.split('\n').filter(Boolean);
      expect(lines, r.stderr).toHaveLength(1);
      expect(lines[0]).toMatch(/^ddk2docker: tar -x into .*\/dom\.partial-[^/]+\/rootfs: tar: .*: Cannot write: No space left on device$/);
      expect(await readdir(small)).toEqual([]);
      expect(await leftovers(work)).toEqual([]);
    } finally {
      await execa('umount', [small]);
    }
  });

  it('SIGINT while the tree is being written: exit 130, no DIR, no DIR.partial-*', async () => {
    const parent = await mkdtemp(join(out, 'int-'));
    const child = startCli(['convert', fixture.iso, '--output', `libvirt-lxc:${join(parent, 'dom')}`, '--workdir', work]);
    let sent = false;
    // The temporary directory appearing means the tree is being written: interrupt right then.
    const watcher = watch(parent, (_event, name) => {
      if (!sent && String(name).startsWith('dom.partial-')) {
        sent = true;
        child.kill('SIGINT');
      }
    });
    const r = await child.finally(() => watcher.close());
    const log = String(r.stderr);
    expect(sent, log).toBe(true);
    expect(r.exitCode, log).toBe(130);
    expect(log).toMatch(/ddk2docker: SIGINT: stopping and cleaning up/);
    expect(await readdir(parent)).toEqual([]);
    expect(await leftovers(work)).toEqual([]);
    await rm(parent, { recursive: true });
  });
});

describe('as uid 65534 without capabilities', () => {
  /** What an unprivileged unpack can keep of the kernel's tree: the documented behaviour. */
  function unprivileged(m: Manifest): { tree: Manifest; devices: number; xattrs: number } {
    const tree: Manifest = new Map();
    let devices = 0;
    let xattrs = 0;
    for (const [p, e] of m) {
      if (e.type === 'character-device' || e.type === 'block-device') {
        devices++;
        continue;
      }
      const kept = Object.entries(e.xattrs).filter(([k]) => !k.startsWith('security.') && !k.startsWith('trusted.'));
      xattrs += Object.keys(e.xattrs).length - kept.length;
      tree.set(p, { ...e, uid: NOBODY, gid: NOBODY, xattrs: Object.fromEntries(kept) } satisfies ManifestEntry);
    }
    return { tree, devices, xattrs };
  }

  it('a usable tree owned by the user, devices and privileged xattrs counted out, container root mapped to the user', async () => {
    const home = await mkdtemp(join(out, 'nobody-'));
    await chown(home, NOBODY, NOBODY);
    const dir = join(home, 'dom');
    const r = await execa(
      'setpriv',
      [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', '--inh-caps=-all', '--bounding-set=-all', '--no-new-privs',
        process.execPath, CLI, 'convert', fixture.iso, '--output', `libvirt-lxc:${dir}`, '--workdir', home, '--json', '--quiet'],
      { reject: false, env: { HOME: home, PATH: process.env.PATH ?? '' }, extendEnv: false },
    );
    expect(String(r.stderr)).toBe('');
    expect(r.exitCode).toBe(0);
    const expected = unprivileged(oracle);
    // The fixture has what an unprivileged run cannot make: this test is not vacuous.
    expect(expected.devices).toBeGreaterThan(0);
    expect(expected.xattrs).toBeGreaterThan(0);
    const result = JSON.parse(String(r.stdout)) as LibvirtJson;
    expect(result.libvirt).toMatchObject({ ownersPreserved: false, devicesSkipped: expected.devices, xattrsSkipped: expected.xattrs, init: '/bin/sh' });
    expect(result.libvirt.warnings).toHaveLength(3);
    expect(result.libvirt.warnings[0]).toMatch(/not privileged .*uid 65534/);

    expectSameTree('unprivileged', expected.tree, await treeManifest(join(dir, 'rootfs')));
    await validate(join(dir, 'domain.xml'));
    const domain = parseDomain(await readFile(join(dir, 'domain.xml'), 'utf8'));
    expect(domain.idmap).toEqual({ uid: { start: '0', target: String(NOBODY), count: '1' }, gid: { start: '0', target: String(NOBODY), count: '1' } });
    expect(await traces(home)).toEqual(['dom']);

    // Without --json the user reads the same facts as warnings.
    const human = await execa(
      'setpriv',
      [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', '--inh-caps=-all', '--bounding-set=-all', '--no-new-privs',
        process.execPath, CLI, 'convert', fixture.iso, '--output', `libvirt-lxc:${join(home, 'dom2')}`, '--workdir', home, '--quiet'],
      { reject: false, env: { HOME: home, PATH: process.env.PATH ?? '' }, extendEnv: false },
    );
    expect(human.exitCode).toBe(0);
    expect(String(human.stderr).split('\n').filter(Boolean)).toEqual(result.libvirt.warnings.map((w) => `ddk2docker: warning: ${w}`));
    await rm(home, { recursive: true });
  });
});
