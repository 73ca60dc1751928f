import { createHash } from 'node:crypto';
import { cp, link, lstat, mkdir, mkdtemp, readdir, readFile, readlink, rm, stat, symlink, unlink, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { compareManifests, displayPath, type Manifest } from '../../src/manifest.js';
import { patch } from '../helpers/bytes.js';
import { leftovers, runCli, startCli } from '../helpers/cli.js';
import { startDockerd, type Dockerd } from '../helpers/dockerd.js';
import { buildMiniDdk, expectOneLine, kernelRootTar, withKernelRoot, type MiniDdk } from '../helpers/faults.js';
import { manifestOfTarFile, savedLayerManifest } from '../helpers/images.js';
import { makeTestCertificate, startXapiStandin, type XapiStandin } from '../helpers/xapi-standin.js';

/**
 * Names and links from an image are data. A root file system full of hostile names (shell
 * metacharacters, option-like and dot names, newlines and escape sequences, backslashes, quotes,
 * 255-byte and non-UTF-8 names) and of symlinks to the host's secrets goes through both engines
 * into a rootfs tarball, a daemon and a libvirt-lxc tree: every name and link target arrives byte
 * for byte as the kernel reads it, nothing is run, nothing is written outside the output, no
 * symlink is followed on the host; messages print such names escaped on one line. The host engine
 * mounts what it reads read-only, nosuid, nodev, noexec. XAPI: TLS is verified before any
 * credential is sent, and the password shows in no argv, output, log, label or catalogue.
 */

/** Would be created if a name ever reached a shell (cwd anywhere: `cd` goes home, `..` up to /). */
const PWNED = '/tmp/ddk2docker-pwned';
const SHELL = 'cd;cd ..;cd tmp;touch ddk2docker-pwned';
/** The name whose inode the damaged variant unlinks. */
const MARKED = 'nl\nesc\x1b[2Jx';
const NAMES: Buffer[] = [
  '..foo', '...', '.. ', ' ', '-rf', '--checkpoint-action=exec=sh', `$(${SHELL})`, `\`${SHELL}\``, `;${SHELL};`, `|${SHELL}`,
  '&&x', '>x', '*', '?', '~', '#x', '!x', 'a\nb', '\n', 'cr\r', 'tab\there', 'esc\x1b[31mred', 'del\x7f',
  'back\\slash', '\\', 'quote"d', "single'quote", '@LongLink', 'PaxHeaders', 'x'.repeat(255), `${'é'.repeat(127)}x`,
  'é', 'e\u0301', MARKED,
].map((s) => Buffer.from(s));
// Not UTF-8: a lone high byte, Latin-1, and overlong spellings of "/" and "..".
NAMES.push(Buffer.from([0xff, 0xfe]), Buffer.from('caf\xe9', 'latin1'), Buffer.from([0xc0, 0xaf]), Buffer.from([0xc0, 0xae, 0xc0, 0xae]), Buffer.from([0x80]));
const LINKS: [string, Buffer][] = [
  ['shadow', Buffer.from('/etc/shadow')],
  ['rootdir', Buffer.from('/root')],
  ['up', Buffer.from('../../../../..')],
  ['cmd', Buffer.from(`$(touch ${PWNED})`)],
  ['nl', Buffer.from('a\nb')],
  ['self', Buffer.from('self')],
  ['latin1', Buffer.from('/etc/caf\xe9', 'latin1')],
  // Longer than fits in the inode: the target lives in a data block.
  ['long', Buffer.from('../'.repeat(1300))],
];
/** What the image's /etc/redhat-release (a link to /etc/hostname) says; the host's /etc/hostname says something else. */
const RELEASE = 'XenServer release 6.5.0 (image\x1b]0;title\x07 side)';
const TAG = 'ddk-sec';
/** Docker writes whole-second mtimes when it tars a layer back (save). */
const DOCKER_MTIME = 1_000_000_000n;

let dockerd: Dockerd;
let mini: MiniDdk;
let dir: string;
let work: string;
let oracle: Manifest;
/** The evil directory's raw names as the kernel lists them. */
let kernelNames: Buffer[];
let shadow: string;
const diffIds = new Set<string>();

const env = () => ({ DOCKER_HOST: dockerd.host });
const sha256 = async (path: string) => createHash('sha256').update(await readFile(path)).digest('hex');
const sortedBuffers = (names: Buffer[]) => [...names].sort(Buffer.compare);

async function populate(root: string): Promise<void> {
  const evil = join(root, 'evil');
  await mkdir(evil);
  // Buffer paths: Node passes the bytes through, whatever their encoding.
  const at = (name: Buffer) => Buffer.concat([Buffer.from(`${evil}/`), name]);
  // Contents in hex: a name's bytes then appear on the disk only in its directory entry.
  for (const name of NAMES) await writeFile(at(name), name.toString('hex'));
  await link(at(Buffer.from('a\nb')), at(Buffer.from(`hard ${SHELL}`)));
  await mkdir(at(Buffer.from(`dir\n$(${SHELL})`)));
  await writeFile(Buffer.concat([at(Buffer.from(`dir\n$(${SHELL})`)), Buffer.from('/-rf\x1b[2J')]), 'inside\n');
  for (const [name, target] of LINKS) await symlink(target, at(Buffer.from(name)));
  await symlink('/etc', join(root, 'etcx'));
  await writeFile(join(root, 'etc/hostname'), `${RELEASE}\nsecond line\n`);
  await unlink(join(root, 'etc/redhat-release'));
  await symlink('/etc/hostname', join(root, 'etc/redhat-release'));
}

beforeAll(async () => {
  await rm(PWNED, { force: true });
  dockerd = await startDockerd();
  dir = await mkdtemp('/tmp/e2e-sec-');
  work = await mkdtemp('/tmp/e2e-sec-work-');
  mini = await buildMiniDdk(join(dir, 'mini'), populate);
  const tar = join(dir, 'kernel.tar');
  await kernelRootTar(mini, tar);
  oracle = await manifestOfTarFile(tar);
  kernelNames = await withKernelRoot(mini, (root) => readdir(Buffer.from(join(root, 'evil')), { encoding: 'buffer' }));
  shadow = await sha256('/etc/shadow');
});

afterAll(async () => {
  await dockerd?.stop();
  await rm(dir, { recursive: true, force: true });
  await rm(work, { recursive: true, force: true });
});

function expectKernelTree(label: string, actual: Manifest, mtimePrecisionNs = 1n): void {
  const diffs = compareManifests(oracle, actual, { mtimePrecisionNs });
  expect(diffs, `${label}: ${diffs.slice(0, 20).join('\n')}`).toEqual([]);
}

/** After every run: nothing ran, the host's secret is untouched, the scratch space is empty. */
async function expectHarmless(): Promise<void> {
  expect(await stat(PWNED).then(() => 'created', () => 'absent')).toBe('absent');
  expect(await sha256('/etc/shadow')).toBe(shadow);
  expect(await leftovers(work)).toEqual([]);
}

it('the fixture holds every hostile name and link as given (the kernel agrees)', () => {
  const expected = [...NAMES, Buffer.from(`hard ${SHELL}`), Buffer.from(`dir\n$(${SHELL})`), ...LINKS.map(([n]) => Buffer.from(n))];
  expect(sortedBuffers(kernelNames)).toEqual(sortedBuffers(expected));
  for (const [name, target] of LINKS) expect(oracle.get(`evil/${name}`)).toMatchObject({ type: 'symlink', linkname: displayPath(target) });
  expect(oracle.get('etcx')).toMatchObject({ type: 'symlink', linkname: '/etc' });
});

describe.each(['builtin', 'host'] as const)('engine %s', (engine) => {
  it('rootfs tarball: the kernel tree byte for byte, links kept as links', async () => {
    const out = join(dir, `${engine}.tar`);
    const r = await runCli(['convert', mini.iso, '--engine', engine, '--output', `rootfs:${out}`, '--workdir', work, '--json', '--quiet']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    diffIds.add((JSON.parse(r.stdout) as { diffId: string }).diffId);
    expectKernelTree(`${engine} rootfs`, await manifestOfTarFile(out));
    await expectHarmless();
  });

  it('daemon: the saved layer is the kernel tree; the release is read through the link inside the image', async () => {
    const tag = `${TAG}:${engine}`;
    const r = await runCli(['convert', mini.iso, '--engine', engine, '--tag', tag, '--workdir', work, '--json', '--quiet'], env());
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    diffIds.add((JSON.parse(r.stdout) as { diffId: string }).diffId);
    expectKernelTree(`${engine} layer`, await savedLayerManifest(dockerd.host, tag), DOCKER_MTIME);
    const labels = JSON.parse(String((await execa('docker', ['image', 'inspect', '--format', '{{json .Config.Labels}}', tag], { env: env() })).stdout)) as Record<string, string>;
    // Followed on the host, /etc/hostname would be this machine's name.
    expect(labels['ddk2docker.release']).toBe(RELEASE);
    await expectHarmless();
  });
});

it('both engines and both outputs: one diffID', () => {
  expect(diffIds.size).toBe(1);
});

it('libvirt-lxc: the tree lands inside DIR only, names and link targets byte for byte', async () => {
  const parent = await mkdtemp(join(dir, 'lxc-'));
  const out = join(parent, 'ddk');
  const r = await runCli(['convert', mini.iso, '--output', `libvirt-lxc:${out}`, '--workdir', work, '--quiet']);
  expect(r.stderr).toBe('');
  expect(r.code).toBe(0);
  expect(await readdir(parent)).toEqual(['ddk']);
  const evil = Buffer.from(join(out, 'rootfs/evil'));
  const names = await readdir(evil, { encoding: 'buffer' });
  expect(sortedBuffers(names)).toEqual(sortedBuffers(kernelNames));
  for (const [name, target] of LINKS) {
    const path = Buffer.concat([evil, Buffer.from(`/${name}`)]);
    expect((await lstat(path)).isSymbolicLink()).toBe(true);
    expect(await readlink(path, { encoding: 'buffer' })).toEqual(target);
  }
  expect(await readlink(join(out, 'rootfs/etcx'))).toBe('/etc');
  for (const name of NAMES) expect(await readFile(Buffer.concat([evil, Buffer.from('/'), name]), 'utf8')).toBe(name.toString('hex'));
  await expectHarmless();
});

it('inspect prints the release read through the link escaped, on one line', async () => {
  const r = await runCli(['inspect', mini.iso, '--quiet', '--workdir', work]);
  expect(r.code, r.stderr).toBe(0);
  const line = r.stdout.split('\n').filter((l) => l.includes('/etc/redhat-release'));
  expect(line).toEqual([`  /etc/redhat-release: ${RELEASE.replace('\x1b', '\\x1b').replace('\x07', '\\x07')}\\x0asecond line`]);
  // eslint-disable-next-line no-control-regex
  expect(r.stdout).not.toMatch(/[\x00-\x08\x0b-\x1f\x7f]/);
  await expectHarmless();
});

it('a label value with a newline (which no Docker LABEL can hold) is refused in one line; no image is added', async () => {
  const before = (await execa('docker', ['images', '-aq'], { env: env() })).stdout;
  const r = await runCli(['convert', mini.iso, '--tag', `${TAG}:nl`, '--label', 'note=one\nLABEL two=2', '--workdir', work, '--quiet'], env());
  expectOneLine(r, /^ddk2docker: label "note": contains a newline, which a Docker LABEL cannot hold$/);
  expect((await execa('docker', ['images', '-aq'], { env: env() })).stdout).toBe(before);
  await expectHarmless();
});

describe('hostile names in damaged file systems: one line, the name escaped', () => {
  /** The raw disk with `search` (a name in a directory block) overwritten by `replacement` of the same length. */
  async function renamed(name: string, search: Buffer, replacement: Buffer): Promise<string> {
    const path = join(dir, name);
    await cp(mini.disk, path);
    const bytes = await readFile(path);
    const at = bytes.indexOf(search, mini.partOffset);
    expect(at).toBeGreaterThan(0);
    expect(bytes.indexOf(search, at + 1)).toBe(-1);
    await patch(path, at, replacement);
    return path;
  }

  it.each(['builtin', 'host'] as const)('a "/" inside a directory entry (engine %s)', async (engine) => {
    const search = Buffer.from('x'.repeat(255));
    const escape = '../../../../tmp/ddk2docker-pwned/';
    const disk = await renamed(`slash-${engine}.raw`, search, Buffer.from(escape + 'x'.repeat(255 - escape.length)));
    const out = join(dir, `slash-${engine}.tar`);
    const r = await runCli(['convert', disk, '--engine', engine, '--output', `rootfs:${out}`, '--workdir', work, '--quiet']);
    expectOneLine(r, engine === 'builtin' ? /contains "\/" or NUL/ : /./);
    expect(r.stderr).toContain(basename(disk));
    expect(await stat(out).then(() => 'written', () => 'absent')).toBe('absent');
    await expectHarmless();
  });

  it.each(['builtin', 'host'] as const)('a name with a newline and an escape sequence naming a deleted inode (engine %s)', async (engine) => {
    const ino = await withKernelRoot(mini, async (root) => (await lstat(join(root, 'evil', MARKED))).ino);
    const disk = join(dir, `unlinked-${engine}.raw`);
    await cp(mini.disk, disk);
    await execa('debugfs', ['-w', '-R', `sif <${ino}> links_count 0`, `${disk}?offset=${mini.partOffset}`]);
    const r = await runCli(['convert', disk, '--engine', engine, '--output', `rootfs:${join(dir, 'unlinked.tar')}`, '--workdir', work, '--quiet']);
    // JSON's escapes (builtin) or GNU tar's (host): the newline as \n, ESC as \u001b or \033.
    expectOneLine(r, /evil\/nl\\nesc\\(u001b|033)\[2Jx/);
    expect(r.stderr).toContain(basename(disk));
    // eslint-disable-next-line no-control-regex
    expect(r.stderr.trimEnd()).not.toMatch(/[\x00-\x1f\x7f]/);
    await expectHarmless();
  });
});

it('host engine: the ISO and the root partition are mounted read-only, nosuid, nodev, noexec, over read-only loop devices', async () => {
  // The partition is mounted only while the map and export stages read it: sample the mount
  // table and the loop devices throughout the run.
  const mounts = new Set<string>();
  const loops = new Map<string, string>();
  let running = true;
  const sampler = (async () => {
    while (running) {
      for (const l of (await readFile('/proc/mounts', 'utf8')).split('\n')) if (l.split(' ')[1]?.startsWith(work)) mounts.add(l);
      for (const dev of await readdir('/sys/block')) {
        const backing = await readFile(`/sys/block/${dev}/loop/backing_file`, 'utf8').catch(() => '');
        if (backing.startsWith(work)) loops.set(dev, (await readFile(`/sys/block/${dev}/ro`, 'utf8').catch(() => '?')).trim());
      }
      await new Promise((r) => setTimeout(r, 2));
    }
  })();
  const r = await runCli(['convert', mini.iso, '--engine', 'host', '--output', `rootfs:${join(dir, 'mounted.tar')}`, '--workdir', work, '--quiet']);
  running = false;
  await sampler;
  expect(r.stderr).toBe('');
  expect(r.code).toBe(0);
  const lines = [...mounts];
  const types = new Set(lines.map((l) => l.split(' ')[2]));
  expect(types.has('ext4'), lines.join('\n')).toBe(true);
  expect([...types].filter((t) => t !== 'ext4'), lines.join('\n')).toEqual([expect.stringMatching(/^(iso9660|fuse\.fuseiso)$/)]);
  for (const l of lines) expect(l.split(' ')[3]!.split(','), l).toEqual(expect.arrayContaining(['ro', 'nosuid', 'nodev', 'noexec']));
  expect(loops.size).toBeGreaterThan(0);
  for (const [dev, ro] of loops) expect(ro, dev).toBe('1');
  await expectHarmless();
});

describe('XAPI credentials', () => {
  let standin: XapiStandin;
  let certFile: string;
  const PASSWORD = `pw-${SHELL}-\x1b-secret`;

  beforeAll(async () => {
    const certificate = await makeTestCertificate(dir);
    certFile = certificate.certFile;
    standin = await startXapiStandin({ tls: certificate, password: PASSWORD });
  });

  afterAll(async () => {
    await standin?.close();
  });

  it('TLS is verified by default: an unknown certificate stops the run before any call, credentials unsent', async () => {
    const r = await runCli(['register', '--vm', standin.vmUuid, '--xapi', standin.url], { XAPI_USER: standin.user, XAPI_PASSWORD: PASSWORD });
    expectOneLine(r, /cannot verify the TLS certificate/);
    expect(r.stderr).toContain(standin.url);
    expect(standin.calls).toEqual([]);
  });

  it('a conversion that registers: the password is in no argv or tool environment, output, log, label or catalogue', async () => {
    const data = await mkdtemp(join(dir, 'data-'));
    const tag = `${TAG}:xapi`;
    const child = startCli(
      ['convert', mini.iso, '--engine', 'host', '--tag', tag, '--register-vm', standin.vmUuid, '--xapi', standin.url, '--xapi-ca', certFile, '--workdir', work, '--json'],
      { ...env(), XAPI_USER: standin.user, XAPI_PASSWORD: PASSWORD, DDK2DOCKER_DATA_DIR: data },
    );
    // Every process on the machine, sampled while the conversion runs: none has the password in
    // its command line, and none of the tools the CLI runs has it in its environment.
    const own = await readFile(`/proc/${child.pid}/cmdline`);
    const sampled = new Set<number>();
    const exposed: string[] = [];
    let running = true;
    const sampler = (async () => {
      while (running) {
        for (const pid of await readdir('/proc').catch(() => [])) {
          if (!/^\d+$/.test(pid)) continue;
          const cmdline = await readFile(`/proc/${pid}/cmdline`).catch(() => Buffer.alloc(0));
          if (cmdline.includes(PASSWORD)) exposed.push(`argv of ${pid}: ${cmdline.toString().replace(/\0/g, ' ')}`);
          // The CLI's tools all name the scratch space (fuseiso, which daemonizes, for the whole
          // run); a copy of the CLI's own command line is the CLI, or a fork not yet running its tool.
          if (!cmdline.includes(work) || cmdline.equals(own)) continue;
          sampled.add(Number(pid));
          const environ = await readFile(`/proc/${pid}/environ`).catch(() => Buffer.alloc(0));
          if (environ.includes(PASSWORD)) exposed.push(`environment of ${pid}: ${cmdline.toString().replace(/\0/g, ' ')}`);
        }
        await new Promise((r) => setTimeout(r, 10));
      }
    })();
    const r = await child;
    running = false;
    await sampler;
    expect(r.exitCode, String(r.stderr)).toBe(0);
    expect(exposed).toEqual([]);
    expect(sampled.size).toBeGreaterThan(0);
    const out = JSON.parse(String(r.stdout)) as { registered?: { vm: string } };
    expect(out.registered?.vm).toBe(standin.vmUuid);
    expect(String(r.stdout)).not.toContain(PASSWORD);
    expect(String(r.stderr)).not.toContain(PASSWORD);
    const inspect = String((await execa('docker', ['image', 'inspect', tag], { env: env() })).stdout);
    expect(inspect).not.toContain(PASSWORD);
    for (const f of await readdir(data, { recursive: true })) {
      const path = join(data, f);
      if ((await stat(path)).isFile()) expect(await readFile(path, 'utf8'), path).not.toContain(PASSWORD);
    }
    // The stand-in saw the password only in the login call, over TLS.
    expect(standin.calls.filter((c) => c.body.includes(PASSWORD)).map((c) => c.method)).toEqual(['session.login_with_password']);
    await expectHarmless();
  });
});
