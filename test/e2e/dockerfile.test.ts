import { chmod, mkdir, mkdtemp, realpath, rename, rm, stat, symlink } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import lockfile from 'proper-lockfile';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '../helpers/cli.js';
import { startDockerd, type Dockerd } from '../helpers/dockerd.js';
import { buildFixture, type FixtureInfo } from '../helpers/fixtures.js';

/**
 * The Dockerfile builds the tool's own image without network and the image converts a DDK as an
 * unprivileged user. No registry is reachable here, so node:20-bookworm-slim is made first: a
 * debootstrap'd Debian bookworm (minbase, cached under .fixtures/) with this Node 20 and its npm
 * where the official image has them (/usr/local).
 */
const REPO = fileURLToPath(new URL('../../', import.meta.url));
const BASE = join(REPO, '.fixtures', 'debian-bookworm-minbase-slim.tar');
const IMAGE = 'ddk2docker:test';

let dockerd: Dockerd;
let fixture: FixtureInfo;
let out: string;

// The classic builder: this docker CLI has no buildx, and the daemon (20.10) has the builder built in.
const docker = (args: string[]) => execa('docker', args, { env: { DOCKER_HOST: dockerd.host, DOCKER_BUILDKIT: '0' } });

/** debootstrap once (needs root and deb.debian.org), then the cached tarball. */
async function debianBase(): Promise<string> {
  const exists = () => stat(BASE).then(() => true, () => false);
  if (await exists()) return BASE;
  await mkdir(dirname(BASE), { recursive: true });
  const release = await lockfile.lock(BASE, { realpath: false, lockfilePath: `${BASE}.lock`, stale: 30_000, retries: { retries: 1200, factor: 1, minTimeout: 500, maxTimeout: 500 } });
  try {
    if (await exists()) return BASE;
    const root = await mkdtemp('/tmp/debootstrap-');
    try {
      await execa('debootstrap', ['--variant=minbase', 'bookworm', root, 'http://deb.debian.org/debian']);
      // mkdtemp made it 0700: as the image's / it would shut every other user out.
      await chmod(root, 0o755);
      // As debian:bookworm-slim: no apt lists, caches, docs or locales; no device nodes (docker makes /dev).
      const exclude = ['var/lib/apt/lists', 'var/cache/apt', 'usr/share/doc', 'usr/share/man', 'usr/share/locale', 'dev'].map((d) => `--exclude=./${d}/*`);
      await execa('tar', ['--numeric-owner', '--xattrs', ...exclude, '-C', root, '-cf', `${BASE}.partial`, '.']);
      await rename(`${BASE}.partial`, BASE);
    } finally {
      await rm(root, { recursive: true, force: true });
      await rm(`${BASE}.partial`, { force: true });
    }
    return BASE;
  } finally {
    await release();
  }
}

/** As Debian's images set it; docker import sets none. */
const PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

/** node:20-bookworm-slim's layout: /usr/local/bin/node, npm in /usr/local/lib/node_modules/npm. */
async function importNodeBase(base: string): Promise<void> {
  const node = process.execPath.slice(1);
  const npm = dirname(dirname(await realpath(String((await execa('which', ['npm'])).stdout).trim()))).slice(1);
  const stage = await mkdtemp('/tmp/nodebase-');
  try {
    await mkdir(join(stage, 'usr/local/bin'), { recursive: true });
    await mkdir(join(stage, 'usr/local/lib/node_modules'), { recursive: true });
    await symlink('../lib/node_modules/npm/bin/npm-cli.js', join(stage, 'usr/local/bin/npm'));
    await symlink('../lib/node_modules/npm/bin/npx-cli.js', join(stage, 'usr/local/bin/npx'));
    const esc = (s: string) => s.replace(/[.[\]*^$\\]/g, '\\$&');
    // One stream into docker import: the Debian tree, then only new paths (docker refuses
    // duplicates), renamed on the way (no temp copy).
    await execa('bsdtar', ['-cf', '-', '-s', `,^${esc(node)}$,usr/local/bin/node,`, '-s', `,^${esc(npm)},usr/local/lib/node_modules/npm,`,
      `@${base}`, '-C', stage, 'usr/local/bin/npm', 'usr/local/bin/npx', 'usr/local/lib/node_modules', '-C', '/', node, npm], { buffer: { stdout: false } })
      .pipe('docker', ['import', '--change', `ENV PATH=${PATH}`, '--change', 'CMD ["node"]', '-', 'node:20-bookworm-slim'], { env: { DOCKER_HOST: dockerd.host } });
  } finally {
    await rm(stage, { recursive: true, force: true });
  }
}

beforeAll(async () => {
  [dockerd, fixture] = await Promise.all([startDockerd(), buildFixture()]);
  await importNodeBase(await debianBase());
  await docker(['build', '--network', 'none', '-t', IMAGE, REPO]);
  out = await mkdtemp('/tmp/e2e-image-out-');
  await chmod(out, 0o777);
}, 1_200_000);

afterAll(async () => {
  await dockerd?.stop();
  if (out) await rm(out, { recursive: true, force: true });
});

describe('the ddk2docker image', () => {
  it('runs as uid 65534 with the CLI as entrypoint and production dependencies only', async () => {
    const image = JSON.parse((await docker(['image', 'inspect', IMAGE])).stdout)[0];
    expect(image.Config.User).toBe('65534:65534');
    expect(image.Config.Entrypoint).toEqual(['node', '--max-semi-space-size=4', '/opt/ddk2docker/dist/cli.js']);
    const { stdout } = await docker(['run', '--rm', '--network', 'none', '--entrypoint', 'ls', IMAGE, '/opt/ddk2docker/node_modules']);
    const modules = stdout.split('\n');
    expect(modules).toEqual(expect.arrayContaining(['commander', 'dockerode', 'got']));
    expect(modules).not.toContain('typescript');
    expect(modules).not.toContain('vitest');
  });

  it('doctor: the builtin engine works unprivileged, the host engine says why not', async () => {
    const { stdout } = await docker(['run', '--rm', '--network', 'none', IMAGE, 'doctor', '--json']);
    type Check = { name: string; ok: boolean; detail: string };
    const report = JSON.parse(stdout) as { engines: Check[]; facilities: Check[] };
    expect(report.engines.find((e) => e.name === 'builtin')?.ok).toBe(true);
    const host = report.engines.find((e) => e.name === 'host');
    expect(host?.ok).toBe(false);
    expect(host?.detail).toMatch(/root/);
    // The sha256 addon comes built from the checkout; ISA-L's would need a libisal the base lacks.
    expect(report.facilities.find((f) => f.name === 'sha256 thread')).toMatchObject({ ok: true });
    expect(report.facilities.find((f) => f.name === 'ISA-L gunzip')).toMatchObject({ ok: false, detail: expect.stringMatching(/zlib/) });
  });

  it('converts a DDK as uid 65534 into a docker-archive that loads with the host conversion\'s diffID', async () => {
    const host = await runCli(['convert', fixture.iso, '--output', `docker-archive:${join(out, 'host.tar')}`, '--quiet', '--json']);
    expect(host.code, host.stderr).toBe(0);
    const hostDiffId = (JSON.parse(host.stdout) as { diffId: string }).diffId;

    const r = await docker(['run', '--rm', '--network', 'none', '--user', '65534:65534', '-v', `${dirname(fixture.iso)}:/in:ro`, '-v', `${out}:/out`,
      IMAGE, 'convert', '/in/ddk.iso', '--output', 'docker-archive:/out/x.tar', '--tag', 'ddk-from-container:1', '--quiet', '--json']);
    const result = JSON.parse(r.stdout) as { diffId: string; path: string };
    expect(result.diffId).toBe(hostDiffId);
    expect(result.path).toBe('/out/x.tar');
    expect((await stat(join(out, 'x.tar'))).uid).toBe(65534);

    await docker(['load', '-i', join(out, 'x.tar')]);
    const loaded = JSON.parse((await docker(['image', 'inspect', 'ddk-from-container:1'])).stdout)[0];
    expect(loaded.RootFS.Layers).toEqual([hostDiffId]);
    const { stdout } = await docker(['run', '--rm', '--network', 'none', 'ddk-from-container:1', 'cat', '/etc/redhat-release']);
    expect(stdout).toContain(fixture.redhatRelease);
  });
});
