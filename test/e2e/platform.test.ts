import { createHash } from 'node:crypto';
import { chmod, mkdir, mkdtemp, rename, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { compareManifests, type Manifest, type ManifestEntry } from '../../src/manifest.js';
import { leftovers, runCli } from '../helpers/cli.js';
import { startDockerd, type Dockerd } from '../helpers/dockerd.js';
import { elf386 } from '../helpers/elf.js';
import { buildFixture, rootOracleTar, type FixtureInfo } from '../helpers/fixtures.js';
import { manifestOfTarFile, savedLayerManifest } from '../helpers/images.js';

/**
 * The image fits the DDK it came from: platform from the tree's ELF binaries, default CMD, the Dom0
 * kernel version in a label and an ENV, and the opt-in uname shim. Two DDK-like trees: x86_64 (the
 * fixture's busybox) and i386 (bin/bash an absolute symlink to a file with an i386 ELF header,
 * absent on the host, so a probe resolving it on the host would not find it).
 */

const KERNEL_64 = '4.19.0+1';
const KERNEL_32 = '2.6.32.43-0.4.1.xs1.8.0.835.170778xen';
const SHIM = 'usr/local/bin/uname';
const DOCKER_MTIME = 1_000_000_000n;

type Node = { file: Buffer | string; mode?: number } | { symlink: string } | { dir: true };

/** A tree for make-fixture's --extra-dir, under .fixtures/ at a path named by its content (the cache key is the path). */
async function extraTree(name: string, nodes: Record<string, Node>): Promise<string> {
  const key = createHash('sha256').update(JSON.stringify(nodes)).digest('hex').slice(0, 12);
  const dir = fileURLToPath(new URL(`../../.fixtures/extra-${name}-${key}`, import.meta.url));
  if (await stat(dir).then(() => true, () => false)) return dir;
  await mkdir(dirname(dir), { recursive: true });
  const tmp = await mkdtemp(`${dir}.partial-`);
  for (const [path, node] of Object.entries(nodes)) {
    const at = join(tmp, path);
    await mkdir('dir' in node ? at : dirname(at), { recursive: true });
    if ('symlink' in node) await symlink(node.symlink, at);
    else if ('file' in node) {
      await writeFile(at, node.file);
      await chmod(at, node.mode ?? 0o644);
    }
  }
  await rename(tmp, dir).catch(async () => rm(tmp, { recursive: true, force: true }));
  return dir;
}

interface JsonResult {
  image: { id: string; tag: string | null } | null;
  diffId: string;
  files: number;
  platform?: string;
  kernel?: string;
  release?: string;
}

interface Inspected {
  Architecture: string;
  Os: string;
  Config: { Cmd: string[] | null; Env: string[] | null; Labels: Record<string, string> };
}

let dockerd: Dockerd;
let work: string;
let amd64: FixtureInfo;
let i386: FixtureInfo;
let oracle64: Manifest;

const env = () => ({ DOCKER_HOST: dockerd.host });
/** --workdir of every run, apart from the outputs, so that anything left in it is a leftover. */
const scratch = () => join(work, 'scratch');
const docker = async (...args: string[]) => String((await execa('docker', args, { env: env() })).stdout);
const inspect = async (ref: string) => (JSON.parse(await docker('image', 'inspect', ref)) as Inspected[])[0]!;

beforeAll(async () => {
  dockerd = await startDockerd();
  work = await mkdtemp('/tmp/e2e-platform-');
  await mkdir(scratch());
  const [a, b] = await Promise.all([
    extraTree('amd64', {
      [`lib/modules/${KERNEL_64}/modules.dep`]: { file: '' },
      'usr/local/bin': { dir: true },
      'bin/uname': { symlink: 'busybox' },
    }),
    extraTree('i386', {
      'bin/bash': { symlink: '/usr/libexec/ddk-i386/bash' },
      'usr/libexec/ddk-i386/bash': { file: elf386(), mode: 0o755 },
      [`lib/modules/${KERNEL_32}/modules.dep`]: { file: '' },
      'lib/modules/2.6.32.99-newer/modules.dep': { file: '' },
      [`usr/src/kernels/${KERNEL_32}-i686/Makefile`]: { file: 'VERSION = 2\n' },
      [SHIM]: { file: '#!/bin/sh\necho mine\n', mode: 0o755 },
      'bin/uname': { symlink: 'busybox' },
    }),
  ]);
  [amd64, i386] = await Promise.all([
    buildFixture({ diskSize: 600_000_000, extraDir: a }),
    buildFixture({ diskSize: 600_000_000, extraDir: b, label: 'XenServer release 6.2.0-70446c (xenenterprise)' }),
  ]);
  oracle64 = await manifestOfTarFile(await rootOracleTar(amd64));
});

afterAll(async () => {
  await dockerd?.stop();
  if (work) await rm(work, { recursive: true, force: true });
});

async function convert(args: string[]): Promise<JsonResult> {
  const r = await runCli(['convert', ...args, '--workdir', scratch(), '--json', '--quiet'], env());
  expect(r.stderr).toBe('');
  expect(r.code).toBe(0);
  expect(await leftovers(scratch())).toEqual([]);
  return JSON.parse(r.stdout) as JsonResult;
}

/** The tree without the shim, after checking the shim's entry: the one difference from the kernel's tree. */
function withoutShim(tree: Manifest, mtimeNs: bigint): Manifest {
  const shim = tree.get(SHIM);
  expect(shim).toMatchObject<Partial<ManifestEntry>>({ type: 'file', mode: 0o755, uid: 0, gid: 0, mtimeNs, xattrs: {} });
  const rest = new Map(tree);
  rest.delete(SHIM);
  return rest;
}

function expectSameTree(label: string, expected: Manifest, actual: Manifest, mtimePrecisionNs = 1n): void {
  const diffs = compareManifests(expected, actual, { mtimePrecisionNs });
  expect(diffs, `${label}: ${diffs.slice(0, 20).join('\n')}`).toEqual([]);
}

describe('x86_64 DDK', () => {
  it('builtin into the daemon with --uname-shim: linux/amd64, kernel label and ENV; uname -r is the DDK kernel, uname -s the real one', async () => {
    const tag = 'ddk-fit:amd64';
    const r = await convert([amd64.iso, '--tag', tag, '--uname-shim']);
    expect(r).toMatchObject({ platform: 'linux/amd64', kernel: KERNEL_64, release: amd64.redhatRelease, files: oracle64.size + 1 });
    const image = await inspect(tag);
    expect([image.Os, image.Architecture]).toEqual(['linux', 'amd64']);
    // No bash in this tree.
    expect(image.Config.Cmd).toEqual(['/bin/sh']);
    expect(image.Config.Env).toEqual(expect.arrayContaining([`DDK_KERNEL_VERSION=${KERNEL_64}`, 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin']));
    expect(image.Config.Labels).toMatchObject({
      'ddk2docker.platform': 'linux/amd64',
      'ddk2docker.kernel': KERNEL_64,
      'ddk2docker.release': amd64.redhatRelease,
      'ddk2docker.uname-shim': '/usr/local/bin/uname',
    });

    const run = async (...cmd: string[]) => (await docker('run', '--rm', '--network', 'none', tag, ...cmd)).trim();
    expect(await run('uname', '-r')).toBe(KERNEL_64);
    expect(await run('sh', '-c', 'echo $DDK_KERNEL_VERSION')).toBe(KERNEL_64);
    expect(await run('uname', '-m')).toBe('x86_64');
    const realName = await run('/bin/uname', '-s');
    expect(realName).toBe('Linux');
    expect(await run('uname', '-s')).toBe(realName);
    expect(await run('/bin/uname', '-r')).not.toBe(KERNEL_64);

    // bin/uname -> busybox, whose mtime the fixture sets to 2015-01-02 03:04:05.123456789.
    const busybox = oracle64.get('bin/busybox')!.mtimeNs;
    expectSameTree('docker save layer', oracle64, withoutShim(await savedLayerManifest(dockerd.host, tag), busybox - (busybox % DOCKER_MTIME)), DOCKER_MTIME);
  });

  it('both engines with --uname-shim write the same layer, and only the shim differs from the kernel tree, to the nanosecond', async () => {
    const diffIds: string[] = [];
    for (const engine of ['host', 'builtin']) {
      const out = join(work, `${engine}.tar`);
      const r = await convert([amd64.iso, '--engine', engine, '--uname-shim', '--output', `rootfs:${out}`]);
      diffIds.push(r.diffId);
      const busybox = oracle64.get('bin/busybox')!.mtimeNs;
      expectSameTree(`${engine} engine`, oracle64, withoutShim(await manifestOfTarFile(out), busybox - (busybox % DOCKER_MTIME)));
      await rm(out);
    }
    expect(diffIds[0]).toBe(diffIds[1]);
  });
});

describe('i386 DDK', () => {
  it('host engine into the daemon: linux/386 set at import, default CMD /bin/bash, the kernel that has a kernel-devel tree', async () => {
    const tag = 'ddk-fit:386';
    const r = await convert([i386.iso, '--engine', 'host', '--tag', tag]);
    // 2.6.32.99-newer is newer, but has no kernel-devel tree to build against.
    expect(r).toMatchObject({ platform: 'linux/386', kernel: KERNEL_32, release: i386.redhatRelease });
    const image = await inspect(tag);
    expect([image.Os, image.Architecture]).toEqual(['linux', '386']);
    // Docker 20.10 imports as its own architecture; the image made again over the same layer replaces it.
    expect((await docker('images', '--all', '--quiet', '--no-trunc', '--filter', `label=ddk2docker.kernel=${KERNEL_32}`)).split('\n')).toEqual([r.image!.id]);
    expect(image.Config.Cmd).toEqual(['/bin/bash']);
    expect(image.Config.Env).toEqual([`DDK_KERNEL_VERSION=${KERNEL_32}`]);
    expect(image.Config.Labels).toMatchObject({ 'ddk2docker.platform': 'linux/386', 'ddk2docker.kernel': KERNEL_32, 'ddk2docker.release': i386.redhatRelease });
    expect(image.Config.Labels['ddk2docker.uname-shim']).toBeUndefined();
  });

  it('builtin to a docker-archive with --change CMD: the config says 386 and the change wins; docker load keeps both', async () => {
    const file = join(work, 'i386.tar');
    const tag = 'ddk-fit:386-archive';
    await convert([i386.iso, '--output', `docker-archive:${file}`, '--tag', tag, '--change', 'CMD ["/bin/sh"]']);
    const manifest = JSON.parse(String((await execa('tar', ['-xOf', file, 'manifest.json'])).stdout)) as { Config: string }[];
    const config = JSON.parse(String((await execa('tar', ['-xOf', file, manifest[0]!.Config])).stdout)) as { architecture: string; os: string; config: Inspected['Config'] };
    expect([config.os, config.architecture]).toEqual(['linux', '386']);
    expect(config.config.Cmd).toEqual(['/bin/sh']);
    expect(config.config.Labels['ddk2docker.platform']).toBe('linux/386');
    await docker('load', '-i', file);
    const image = await inspect(tag);
    expect([image.Architecture, image.Config.Cmd]).toEqual(['386', ['/bin/sh']]);
    await rm(file);
  });

  it('--uname-shim refuses a tree that already has /usr/local/bin/uname, and leaves nothing behind', async () => {
    const out = join(work, 'refused.tar');
    const r = await runCli(['convert', i386.iso, '--uname-shim', '--output', `rootfs:${out}`, '--workdir', scratch(), '--quiet'], env());
    expect(r.code).toBe(1);
    expect(r.stderr).toBe('ddk2docker: ddk.iso: --uname-shim: the image already has /usr/local/bin/uname; it is left alone rather than replaced');
    expect(await stat(out).catch(() => undefined)).toBeUndefined();
    expect(await leftovers(scratch())).toEqual([]);
  });
});
