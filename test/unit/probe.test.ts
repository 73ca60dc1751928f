import { copyFile, mkdir, readFile, rm, symlink, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InputError } from '../../src/errors.js';
import { elfArchitecture, parseElfIdent } from '../../src/formats/elf.js';
import { ExtFileSystem } from '../../src/formats/ext/index.js';
import { FileSource } from '../../src/formats/source.js';
import { appendToTar, packTree, readTar, type AddedFile, type TreeEntry } from '../../src/formats/tar.js';
import { chooseKernel, compareVersions, extTree, imageFit, mountTree, probeRoot, type RootProbe } from '../../src/pipeline/probe.js';
import { unameShimFile, unameShimScript } from '../../src/pipeline/uname-shim.js';
import { elf386 } from '../helpers/elf.js';
import { HOST_TAR_ARGS, gnuTar, makeImage, makeTemp, withMount } from '../helpers/extfixtures.js';

const NS = 1_000_000_000n;
const KERNEL = '2.6.32.43-0.4.1.xs1.8.0.835.170778xen';

let tmp: string;
let content: string;

beforeAll(async () => {
  tmp = await makeTemp('probe-test-');
  content = join(tmp, 'root');
  const dirs = ['bin', 'etc', 'opt/i386', 'usr/bin', 'usr/local/bin', `lib/modules/${KERNEL}`, 'lib/modules/2.6.32.99-newer', 'lib/modules/not-a-version',
    `usr/src/kernels/${KERNEL}-i686`];
  for (const d of dirs) await mkdir(join(content, d), { recursive: true });
  await copyFile('/bin/busybox', join(content, 'bin/busybox'));
  await utimes(join(content, 'bin/busybox'), 1_400_000_000, 1_400_000_000);
  await symlink('busybox', join(content, 'bin/sh'));
  await symlink('/bin/busybox', join(content, 'bin/uname'));
  // Absolute, and absent on the host: resolved on the host it would find nothing (or the host's file).
  await symlink('/opt/i386/bash', join(content, 'bin/bash'));
  await writeFile(join(content, 'opt/i386/bash'), elf386());
  await symlink('../../../../../opt/i386/bash', join(content, 'usr/bin/up'));
  await writeFile(join(content, 'lib/modules/3.0-a-file'), 'not a directory\n');
  await writeFile(join(content, 'etc/redhat-release'), 'XenServer release 6.2.0-70446c (xenenterprise)\nsecond line\n');
  await writeFile(join(content, 'etc/os-release'), 'PRETTY_NAME="not this one"\n');
});

afterAll(async () => {
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

describe('ELF header', () => {
  it('tells x86_64 (a real binary) from i386, and nothing else counts', async () => {
    const busybox = parseElfIdent(await readFile('/bin/busybox'));
    expect(busybox && elfArchitecture(busybox)).toBe('amd64');
    expect(elfArchitecture(parseElfIdent(elf386())!)).toBe('386');
    const x32 = elf386();
    x32.writeUInt16LE(62, 18);
    expect(elfArchitecture(parseElfIdent(x32)!)).toBeUndefined();
    const big = elf386();
    big[5] = 2;
    expect(elfArchitecture(parseElfIdent(big)!)).toBeUndefined();
    expect(parseElfIdent(Buffer.from('#!/bin/sh\necho not an ELF file\n'))).toBeUndefined();
    expect(parseElfIdent(elf386().subarray(0, 19))).toBeUndefined();
  });
});

describe('kernel versions', () => {
  it('order like rpm: numbers as numbers, numbers after letters', () => {
    const sorted = ['2.6.32.9', '2.6.32.10', '2.6.18-8.el5', '3.10.0-1160.el7', '2.6.32.10a', '4.19.0+1'].sort(compareVersions);
    expect(sorted).toEqual(['2.6.18-8.el5', '2.6.32.9', '2.6.32.10', '2.6.32.10a', '3.10.0-1160.el7', '4.19.0+1']);
  });

  it('prefer one with a kernel-devel tree, else the newest', () => {
    expect(chooseKernel([], [])).toEqual({});
    expect(chooseKernel(['4.19.0+1'], [])).toEqual({ kernel: '4.19.0+1' });
    expect(chooseKernel(['2.6.32.43', '2.6.32.99'], ['2.6.32.43']).kernel).toBe('2.6.32.43');
    expect(chooseKernel(['2.6.32.43', '2.6.32.99'], []).kernel).toBe('2.6.32.99');
    expect(chooseKernel(['2.6.32.43', '2.6.32.99'], []).choice).toMatch(/the newest$/);
  });
});

describe('probe of a root file system', () => {
  const expected = {
    elf: { path: 'bin/bash', architecture: '386' },
    modules: [KERNEL, '2.6.32.99-newer'],
    devel: [KERNEL],
    kernel: KERNEL,
    release: 'XenServer release 6.2.0-70446c (xenenterprise)',
    shell: '/bin/bash',
    uname: { exists: false, binDir: true, mtimeNs: 1_400_000_000n * NS },
  };

  it('reads a directory tree, resolving symlinks inside it', async () => {
    const tree = mountTree(content, 'content');
    expect(await probeRoot(tree)).toMatchObject(expected);
    expect(await tree.head('usr/bin/up', 52)).toEqual(elf386());
  });

  it('the ext reader and the kernel mount of the same image give the same probe', async () => {
    const img = await makeImage({ name: 'probe', type: 'ext4', sizeMiB: 16 }, content, tmp, false);
    const fs = await ExtFileSystem.open(await FileSource.open(img));
    const viaExt = await probeRoot(extTree(fs));
    const viaMount = await withMount(img, (dir) => probeRoot(mountTree(dir, img)));
    expect(viaExt).toMatchObject(expected);
    expect(viaMount).toEqual(viaExt);
  });

  it('a symlink loop is an error naming the tree, on both readers alike', async () => {
    const loop = join(tmp, 'loop');
    await mkdir(join(loop, 'bin'), { recursive: true });
    await symlink('/bin/bash', join(loop, 'bin/bash'));
    await expect(probeRoot(mountTree(loop, 'loop-tree'))).rejects.toThrow(/^loop-tree: too many levels of symbolic links resolving "bin\/bash"/);
  });
});

describe('image fit', () => {
  const probe: RootProbe = {
    elf: { path: 'bin/bash', ident: { EI_CLASS: 1, EI_DATA: 1, e_machine: 3 }, architecture: '386' },
    modules: [KERNEL],
    devel: [],
    kernel: KERNEL,
    release: 'XenServer release 6.2.0',
    shell: '/bin/bash',
    uname: { exists: false, binDir: true, mtimeNs: 1_400_000_000_500_000_000n },
  };
  const fit = (changes: string[], unameShim = false, p: RootProbe = probe) => imageFit(p, { input: 'ddk.iso', changes, unameShim });

  it('platform, labels, ENV and a default CMD', () => {
    expect(fit([])).toEqual({
      architecture: '386',
      platform: 'linux/386',
      kernel: KERNEL,
      release: 'XenServer release 6.2.0',
      labels: { 'ddk2docker.platform': 'linux/386', 'ddk2docker.kernel': KERNEL, 'ddk2docker.release': 'XenServer release 6.2.0' },
      changes: [`ENV DDK_KERNEL_VERSION=${KERNEL}`, 'CMD ["/bin/bash"]'],
    });
    expect(imageFit(probe, { input: 'ddk.iso', changes: [], unameShim: false, architecture: 'amd64' }).platform).toBe('linux/amd64');
  });

  it("the user's CMD or ENTRYPOINT wins", () => {
    expect(fit(['CMD ["/bin/sh"]']).changes).not.toContain('CMD ["/bin/bash"]');
    expect(fit(['ENTRYPOINT ["/init"]']).changes).not.toContain('CMD ["/bin/bash"]');
    expect(fit(['LABEL a=b']).changes).toContain('CMD ["/bin/bash"]');
  });

  it('an ELF for another machine is refused unless an architecture is given', () => {
    const arm: RootProbe = { ...probe, elf: { path: 'bin/bash', ident: { EI_CLASS: 2, EI_DATA: 1, e_machine: 183 } } };
    expect(() => fit([], false, arm)).toThrow(/^ddk\.iso: \/bin\/bash is a 64-bit ELF file for e_machine 183/);
    const none: RootProbe = { ...probe };
    delete none.elf;
    expect(fit([], false, none).architecture).toBe('amd64');
  });

  it('with the shim: its label, a PATH that finds it first, and a refusal of a PATH that would not', () => {
    const f = fit([], true);
    expect(f.labels['ddk2docker.uname-shim']).toBe('/usr/local/bin/uname');
    expect(f.changes).toContain('ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin');
    expect(() => fit(['ENV PATH=/bin:/usr/local/bin'], true)).toThrow(/--uname-shim: .*does not look in \/usr\/local\/bin before \/bin/);
    expect(fit(['ENV PATH=/opt/bin:$PATH'], true).platform).toBe('linux/386');
  });

  it('the shim file, or why the tree cannot take it', () => {
    const shim = unameShimFile(probe, '386', 'ddk.iso');
    expect(shim.entry).toMatchObject({ path: Buffer.from('usr/local/bin/uname'), type: 'file', mode: 0o755, uid: 0, gid: 0, mtimeNs: 1_400_000_000n * NS, size: shim.data.length });
    expect(shim.data.toString()).toContain(`release='${KERNEL}'\nmachine='i686'\n`);
    const noKernel: RootProbe = { ...probe };
    delete noKernel.kernel;
    expect(() => unameShimFile(noKernel, '386', 'ddk.iso')).toThrow(/^ddk\.iso: --uname-shim: no kernel version found/);
    expect(() => unameShimFile({ ...probe, uname: { ...probe.uname, exists: true } }, '386', 'ddk.iso')).toThrow(InputError);
    expect(() => unameShimFile({ ...probe, uname: { ...probe.uname, binDir: false } }, '386', 'ddk.iso')).toThrow(/\/usr\/local\/bin is not a directory/);
  });
});

describe('the uname shim script', () => {
  it('answers -r and -m as the DDK, everything else as the real uname', async () => {
    const script = join(tmp, 'uname');
    await writeFile(script, unameShimScript(KERNEL, 'i686'), { mode: 0o755 });
    const real = async (...a: string[]) => (await execa('/bin/uname', a)).stdout;
    for (const sh of ['sh', 'busybox']) {
      const run = async (...a: string[]) => (await execa(sh, [...(sh === 'busybox' ? ['sh'] : []), script, ...a], { reject: false })).stdout;
      expect(await run('-r')).toBe(KERNEL);
      expect(await run('--kernel-release')).toBe(KERNEL);
      expect(await run('-m')).toBe('i686');
      expect(await run()).toBe(await real('-s'));
      expect(await run('-s')).toBe(await real('-s'));
      expect(await run('-sr')).toBe(`${await real('-s')} ${KERNEL}`);
      expect(await run('-n', '-r')).toBe(`${await real('-n')} ${KERNEL}`);
      expect(await run('-a')).toBe(`${await real('-s')} ${await real('-n')} ${KERNEL} ${await real('-v')} i686 ${await real('-o')}`);
      expect(await run('--version')).toBe(await real('--version'));
    }
  });
});

describe('appendToTar', () => {
  const entries: TreeEntry[] = [
    { path: Buffer.alloc(0), type: 'directory', mode: 0o755, uid: 0, gid: 0, size: 0, mtimeNs: 1_500_000_000n * NS },
    { path: Buffer.from('data'), type: 'file', mode: 0o644, uid: 0, gid: 0, size: 1000, mtimeNs: 1_500_000_000_250_000_000n },
    { path: Buffer.from('long/'.repeat(30) + 'x'), type: 'file', mode: 0o600, uid: 5, gid: 6, size: 0, mtimeNs: 1_500_000_000n * NS },
  ];
  const added: AddedFile = {
    entry: { path: Buffer.from('usr/local/bin/uname'), type: 'file', mode: 0o755, uid: 0, gid: 0, size: 11, mtimeNs: 1_400_000_000n * NS },
    data: Buffer.from('#!/bin/sh\n\n'),
  };
  const data = (e: TreeEntry) => (async function* () {
    if (e.size) yield Buffer.alloc(e.size, 0x61);
  })();
  const collect = async (s: NodeJS.ReadableStream) => {
    const parts: Buffer[] = [];
    for await (const c of s) parts.push(c as Buffer);
    return Buffer.concat(parts);
  };
  async function* from(items: TreeEntry[]) {
    yield* items;
  }

  it('gives what packTree gives with the file as the last entry, byte for byte', async () => {
    const appended = await collect(appendToTar(packTree(from(entries), data).stream, [added]));
    const whole = await collect(packTree(from([...entries, added.entry]), (e) => (e === added.entry ? (async function* () { yield added.data; })() : data(e))).stream);
    expect(appended.equals(whole)).toBe(true);
    expect(appended.length % 10240).toBe(0);
  });

  it('after a GNU tar stream: GNU tar reads the file back as the last entry', async () => {
    const dir = join(tmp, 'gnu');
    await mkdir(join(dir, 'sub'), { recursive: true });
    await writeFile(join(dir, 'sub', 'f'), Buffer.alloc(700, 0x62));
    const out = join(tmp, 'appended.tar');
    const tar = gnuTar(dir, HOST_TAR_ARGS);
    await writeFile(out, appendToTar(tar.stream, [added]));
    await tar.done;
    const list = (await execa('tar', ['-tf', out])).stdout.split('\n');
    expect(list.at(-1)).toBe('usr/local/bin/uname');
    expect(String((await execa('tar', ['-xOf', out, 'usr/local/bin/uname'], { stripFinalNewline: false })).stdout)).toBe(added.data.toString());
    const names: string[] = [];
    await readTar((await import('node:fs')).createReadStream(out), out, async (h) => void names.push(h.path.toString()));
    expect(names.at(-1)).toBe('usr/local/bin/uname');
  });

  it('a stream that ends without its end-of-archive marker is an error', async () => {
    const bytes = await collect(packTree(from(entries), data).stream);
    const { Readable } = await import('node:stream');
    await expect(collect(appendToTar(Readable.from([bytes.subarray(0, 1536)]), [added], { input: 'cut.tar' }))).rejects.toThrow(/^cut\.tar: tar stream ends without an end-of-archive marker/);
  });
});
