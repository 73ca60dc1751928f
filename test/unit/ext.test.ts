import { copyFile, mkdir, open, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InputError } from '../../src/errors.js';
import { ExtFileSystem, type ExtEntry } from '../../src/formats/ext/index.js';
import { FileSource, type Source } from '../../src/formats/source.js';
import { packTree, readTar } from '../../src/formats/tar.js';
import { compareManifests, manifestFromTar } from '../../src/manifest.js';
import {
  HOST_TAR_ARGS, KERNEL_TAR_ARGS, gnuTar, makeContentTree, makeImage, makeTemp, pattern, withMount, type ImageSpec,
} from '../helpers/extfixtures.js';

// The kernel (a read-only, no-replay loop mount) read by GNU tar is the oracle for every image.

const MATRIX: ImageSpec[] = [
  { name: 'ext2-1k-128', type: 'ext2', blockSize: 1024, inodeSize: 128 },
  { name: 'ext2-4k-256', type: 'ext2', blockSize: 4096, inodeSize: 256 },
  { name: 'ext3-1k-256', type: 'ext3', blockSize: 1024, inodeSize: 256 },
  { name: 'ext3-4k-128', type: 'ext3', blockSize: 4096, inodeSize: 128 },
  { name: 'ext4-4k-256', type: 'ext4', blockSize: 4096, inodeSize: 256 },
  { name: 'ext4-1k-128', type: 'ext4', blockSize: 1024, inodeSize: 128 },
  { name: 'ext4-inline', type: 'ext4', blockSize: 4096, inodeSize: 256, features: ['inline_data'] },
  { name: 'ext4-inline-1k', type: 'ext4', blockSize: 1024, inodeSize: 256, features: ['inline_data', '^has_journal'] },
  // 38 groups of 8 MiB, 16 descriptors per block: three meta groups.
  { name: 'ext4-64bit-meta_bg', type: 'ext4', blockSize: 1024, inodeSize: 256, features: ['64bit', 'meta_bg', '^resize_inode'], sizeMiB: 300 },
  { name: 'ext4-bigalloc', type: 'ext4', blockSize: 4096, inodeSize: 256, features: ['bigalloc', '^has_journal'], extra: ['-C', '16384'] },
];

let tmp: string;
let content: string;
const images = new Map<string, string>();

async function kernelInlineWrites(mnt: string): Promise<void> {
  await mkdir(join(mnt, 'kernel/inline-dir'), { recursive: true });
  await writeFile(join(mnt, 'kernel/inline-100'), pattern(100, 100));
  for (const n of ['a', 'bb', 'ccc', 'dddd', 'eeeee', 'ffffff']) await writeFile(join(mnt, 'kernel/inline-dir', n), n);
}

/** Run `fn` over `items`, `width` at a time (2 cores: mke2fs runs two at once). */
async function inParallel<T>(items: T[], width: number, fn: (item: T) => Promise<void>): Promise<void> {
  const queue = [...items];
  await Promise.all(Array.from({ length: width }, async () => {
    for (let item = queue.shift(); item !== undefined; item = queue.shift()) await fn(item);
  }));
}

beforeAll(async () => {
  tmp = await makeTemp('ext-test-');
  content = join(tmp, 'content');
  await makeContentTree(content);
  await inParallel(MATRIX, 2, async (spec) => {
    const img = await makeImage(spec, content, tmp);
    // mke2fs -d keeps only what fits in i_block inline; the kernel also uses the system.data xattr.
    if (spec.features?.includes('inline_data')) await withMount(img, kernelInlineWrites, true);
    images.set(spec.name, img);
  });
});

afterAll(async () => {
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

async function withFs<T>(img: string, fn: (fs: ExtFileSystem) => Promise<T>): Promise<T> {
  const src = await FileSource.open(img);
  try {
    return await fn(await ExtFileSystem.open(src));
  } finally {
    await src.close();
  }
}

/** Our archive of an image, as packTree makes it from walk + readFile. */
function ourTar(fs: ExtFileSystem): { stream: Readable; done: Promise<unknown> } {
  return packTree(fs.walk(), (e) => fs.readFile(e), { input: 'image' });
}

/** Where two byte streams first differ, or undefined when they are identical. Both are consumed. */
async function firstDifference(a: Readable, b: Readable): Promise<{ offset: number; a: Buffer; b: Buffer } | undefined> {
  const ia = a[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
  const ib = b[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
  let ba: Buffer = Buffer.alloc(0);
  let bb: Buffer = Buffer.alloc(0);
  let endA = false;
  let endB = false;
  let offset = 0;
  try {
    for (;;) {
      if (!ba.length && !endA) {
        const r = await ia.next();
        if (r.done) endA = true;
        else ba = r.value;
      }
      if (!bb.length && !endB) {
        const r = await ib.next();
        if (r.done) endB = true;
        else bb = r.value;
      }
      if (!ba.length && !bb.length && endA && endB) return undefined;
      const n = Math.min(ba.length, bb.length);
      if (n === 0 || !ba.subarray(0, n).equals(bb.subarray(0, n))) {
        let i = 0;
        while (i < n && ba[i] === bb[i]) i++;
        const block = (x: Buffer) => x.subarray(Math.max(0, i - (offset + i) % 512), i + 512);
        return { offset: offset + i, a: block(ba), b: block(bb) };
      }
      offset += n;
      ba = ba.subarray(n);
      bb = bb.subarray(n);
    }
  } finally {
    await ia.return?.();
    await ib.return?.();
  }
}

async function kernelManifest(img: string) {
  return withMount(img, async (dir) => {
    const tar = gnuTar(dir, KERNEL_TAR_ARGS);
    const [m] = await Promise.all([manifestFromTar(tar.stream, 'kernel tar'), tar.done]);
    return m;
  });
}

/**
 * GNU tar of the mount as the host engine would run it, but naming the top-level entries
 * instead of "." so that names carry no "./" prefix, as ours do; the root itself is "./".
 */
async function expectSameBytesAsGnuTar(img: string, fs: ExtFileSystem): Promise<void> {
  await withMount(img, async (dir) => {
    const top = (await readdir(dir, { encoding: 'buffer' })).sort(Buffer.compare).map((n) => n.toString());
    const gnu = gnuTar(dir, HOST_TAR_ARGS, ['--no-recursion', '.', '--recursion', ...top]);
    const ours = ourTar(fs);
    const diff = await firstDifference(gnu.stream, ours.stream);
    await gnu.done;
    if (diff) {
      await ours.done.catch(() => undefined);
      expect.fail(`archives differ at byte ${diff.offset}:\nGNU tar: ${JSON.stringify(diff.a.toString('latin1'))}\nours:    ${JSON.stringify(diff.b.toString('latin1'))}`);
    }
    await ours.done;
  });
}

describe.each(MATRIX)('$name', (spec) => {
  it('yields the same tree as the kernel (GNU tar of a loop mount)', async () => {
    const img = images.get(spec.name)!;
    const kernel = await kernelManifest(img);
    await withFs(img, async (fs) => {
      expect(fs.info.type).toBe(spec.type);
      expect(fs.info.blockSize).toBe(spec.blockSize);
      for (const f of spec.features ?? []) if (!f.startsWith('^')) expect(fs.info.features).toContain(f);
      const ours = ourTar(fs);
      const [manifest] = await Promise.all([manifestFromTar(ours.stream, 'our tar'), ours.done]);
      expect(compareManifests(kernel, manifest, { includeRoot: true })).toEqual([]);
      expect(manifest.size).toBe(kernel.size);
      expect(manifest.size).toBeGreaterThan(5000);
    });
  });

  it('writes the same bytes as GNU tar', async () => {
    const img = images.get(spec.name)!;
    await withFs(img, (fs) => expectSameBytesAsGnuTar(img, fs));
  });
});

/** Our archive with small files read at once where they can be (readFileNow), as the export makes it. */
async function tarAtOnce(img: string): Promise<{ tar: Buffer; atOnce: number; files: number }> {
  const src = await FileSource.open(img);
  try {
    const fs = await ExtFileSystem.open(src);
    let atOnce = 0;
    let files = 0;
    const packed = packTree(fs.walk(), (e) => {
      files++;
      const now = fs.readFileNow(e);
      if (now) atOnce++;
      return now ?? fs.readFile(e);
    }, { input: 'image' });
    const parts: Buffer[] = [];
    for await (const chunk of packed.stream) parts.push(chunk as Buffer);
    await packed.done;
    return { tar: Buffer.concat(parts), atOnce, files };
  } finally {
    await src.close();
  }
}

async function tarOf(packed: { stream: Readable; done: Promise<unknown> }): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const chunk of packed.stream) parts.push(chunk as Buffer);
  await packed.done;
  return Buffer.concat(parts);
}

describe('small files read at once (readFileNow, the export\'s path)', () => {
  it.each(MATRIX.map((m) => m.name))('%s: the same archive as readFile alone, most small files at once', async (name) => {
    const img = images.get(name)!;
    const alone = await withFs(img, (fs) => tarOf(ourTar(fs)));
    const { tar, atOnce, files } = await tarAtOnce(img);
    expect(tar.equals(alone)).toBe(true);
    // Every image has dozens of small files mapped from the inode alone (1 KiB blocks: up to 12 KiB on ext2/3).
    expect(atOnce).toBeGreaterThan(files / 3);
  });

  it('holes, unwritten extents and a size past the last block read as zeros, as from readFile', async () => {
    const img = join(tmp, 'at-once.img');
    await copyFile(images.get('ext4-4k-256')!, img);
    await withMount(img, async (dir) => {
      await mkdir(join(dir, 'at-once'));
      const at = (f: string) => join(dir, 'at-once', f);
      const fh = await open(at('holes'), 'w');
      await fh.write(pattern(100, 1), 0, 100, 0);
      await fh.write(pattern(100, 2), 0, 100, 30_000);
      await fh.close();
      await execa('fallocate', ['-l', '20000', at('unwritten')]);
      await execa('fallocate', ['-l', '20000', at('half-written')]);
      const half = await open(at('half-written'), 'r+');
      await half.write(pattern(5000, 3), 0, 5000, 4096);
      await half.close();
      await writeFile(at('tail-hole'), pattern(10, 4));
      await execa('truncate', ['-s', '50000', at('tail-hole')]);
      await writeFile(at('exactly-64k'), pattern(65536, 5));
      await writeFile(at('over-64k'), pattern(65537, 6));
    }, true);
    const src = await FileSource.open(img);
    try {
      const fs = await ExtFileSystem.open(src);
      const read = async (e: ExtEntry) => {
        const parts: Buffer[] = [];
        for await (const c of fs.readFile(e)) parts.push(c);
        return Buffer.concat(parts);
      };
      const entry = async (n: string) => (await fs.lookup(`at-once/${n}`))!;
      for (const n of ['holes', 'unwritten', 'half-written', 'tail-hole', 'exactly-64k']) {
        const e = await entry(n);
        const now = fs.readFileNow(e);
        expect(now, n).toBeDefined();
        expect(now!.equals(await read(e)), n).toBe(true);
      }
      expect(fs.readFileNow(await entry('unwritten'))!.equals(Buffer.alloc(20000))).toBe(true);
      expect(fs.readFileNow(await entry('holes'))!.subarray(100, 30_000).equals(Buffer.alloc(29_900))).toBe(true);
      expect(fs.readFileNow(await entry('over-64k'))).toBeUndefined();
      // Not given by walk or lookup: readFile's job.
      expect(fs.readFileNow({ ino: (await entry('holes')).ino })).toBeUndefined();
    } finally {
      await src.close();
    }
  });

  it('nothing at once from a source that cannot read at once, but inline data', async () => {
    for (const name of ['ext4-4k-256', 'ext4-inline']) {
      const file = await FileSource.open(images.get(name)!);
      try {
        const asyncOnly: Source = { name: file.name, size: file.size, read: (p, n) => file.read(p, n), close: () => file.close() };
        const fs = await ExtFileSystem.open(asyncOnly);
        let atOnce = 0;
        for await (const e of fs.walk()) if (e.type === 'file' && fs.readFileNow(e)) atOnce++;
        if (name === 'ext4-inline') expect(atOnce).toBeGreaterThan(0);
        else expect(atOnce).toBe(0);
      } finally {
        await file.close();
      }
    }
  });
});

describe('walk and lookup', () => {
  it('covers what it claims: deep extent trees, triple indirect blocks, inline data in system.data, inline symlinks', async () => {
    const debugfs = async (img: string, cmd: string) => (await execa('debugfs', ['-R', cmd, images.get(img)!])).stdout;
    expect(await debugfs('ext4-1k-128', 'ex /sparse/fragmented')).toMatch(/^ 2\/ 2 /m);
    expect(await debugfs('ext2-1k-128', 'stat /sparse/triple-indirect')).toMatch(/\(TIND\)/);
    for (const img of ['ext4-inline', 'ext4-inline-1k']) {
      expect(await debugfs(img, 'stat /kernel/inline-100')).toMatch(/Size of inline data: (6[1-9]|[7-9]\d|\d{3})/);
      expect(await debugfs(img, 'stat /kernel/inline-dir')).toMatch(/Size of inline data: (6[1-9]|[7-9]\d|\d{3})/);
      expect(await debugfs(img, 'stat /links/slow-60')).toMatch(/Flags: 0x10000000/);
    }
  });

  it('reads htree directories (e2fsck -D indexed the big one)', async () => {
    for (const name of ['ext4-1k-128', 'ext3-4k-128']) {
      const img = images.get(name)!;
      expect((await execa('debugfs', ['-R', 'htree /big', img])).stdout).toMatch(/Root node dump/);
      await withFs(img, async (fs) => {
        let n = 0;
        for await (const e of fs.walk()) if (e.path.toString().startsWith('big/') && !e.path.toString().slice(4).includes('/')) n++;
        expect(n).toBe(5000);
      });
    }
  });

  it('walks depth first, names in byte order, root first', async () => {
    await withFs(images.get('ext4-4k-256')!, async (fs) => {
      const paths: Buffer[] = [];
      for await (const e of fs.walk()) paths.push(e.path);
      expect(paths[0]!.length).toBe(0);
      // Depth-first with sorted siblings means every path sorts after its predecessor when
      // "/" sorts before every other byte; compare component-wise.
      const key = (p: Buffer) => Buffer.from(p.toString('latin1').replace(/\//g, '\0'), 'latin1');
      for (let i = 1; i < paths.length; i++) expect(Buffer.compare(key(paths[i - 1]!), key(paths[i]!))).toBe(-1);
      expect(paths.some((p) => p.toString() === 'deep/' + Array.from({ length: 60 }, (_, i) => `level-${String(i + 1).padStart(2, '0')}`).join('/') + '/leaf.txt')).toBe(true);
      expect(paths.some((p) => p.equals(Buffer.from([...Buffer.from('names/'), 0x6e, 0xff, 0xfe, 0x80])))).toBe(true);
    });
  });

  it('reports entries as lstat, readlink and getxattr would', async () => {
    await withFs(images.get('ext4-4k-256')!, async (fs) => {
      const get = async (p: string) => (await fs.lookup(p))!;
      const release = await get('etc/os-release');
      expect(release.type).toBe('file');
      const parts: Buffer[] = [];
      for await (const chunk of fs.readFile(release)) parts.push(chunk);
      expect(Buffer.concat(parts).toString()).toContain('ID=fixture');
      expect((await get('links/slow-900')).symlinkTarget!.toString()).toBe('y'.repeat(900));
      expect((await get('links/fast')).symlinkTarget!.toString()).toBe('target-file');
      const dev = await get('dev/wide');
      expect([dev.type, dev.devmajor, dev.devminor]).toEqual(['character-device', 300, 70000]);
      expect((await get('dev/fifo')).type).toBe('fifo');
      expect((await get('dev/socket')).type).toBe('socket');
      expect((await get('modes/odd')).mode).toBe(0o6501);
      expect((await get('modes/sticky')).mode).toBe(0o1777);
      const owner = await get('owners/huge');
      expect([owner.uid, owner.gid]).toEqual([3_000_000, 3_000_001]);
      expect((await get('times/nanoseconds')).mtimeNs).toBe(1_577_934_245_123_456_789n);
      expect((await get('times/before-1970')).mtimeNs).toBe(-1_500_000_000n);
      expect((await get('times/year-2100')).mtimeNs).toBe(4_102_444_800_500_000_000n);
      const [a, b, c] = await Promise.all(['links/hard-a', 'links/hard-b', 'files/hard-c'].map(get));
      expect(new Set([a!.ino, b!.ino, c!.ino]).size).toBe(1);
      expect(a!.nlink).toBe(3);
      const xattrs = (await get('xattrs/user')).xattrs;
      expect(xattrs.get('user.binary')).toEqual(Buffer.from([0, 0xff, 0x0a, 0x3d, 0x25]));
      expect((await get('xattrs/cap')).xattrs.get('security.capability')!.readUInt32LE(0) >>> 24).toBe(2);
      expect((await get('xattrs/large')).xattrs.get('user.large')).toEqual(pattern(900, 9));
    });
  });

  it('looks paths up, following symlinks inside the image only', async () => {
    await withFs(images.get('ext4-inline')!, async (fs) => {
      expect((await fs.lookup('links/absolute'))!.type).toBe('symlink');
      expect((await fs.lookup('links/absolute', { follow: true }))!.path.toString()).toBe('etc/os-release');
      expect((await fs.lookup('/links/up/os-release'))!.path.toString()).toBe('etc/os-release');
      expect((await fs.lookup('links/up/../../../etc/./os-release'))!.path.toString()).toBe('etc/os-release');
      expect(await fs.lookup('links/dangling', { follow: true })).toBeUndefined();
      expect(await fs.lookup('etc/os-release/x')).toBeUndefined();
      expect(await fs.lookup('no/such/file')).toBeUndefined();
      expect((await fs.lookup(''))!.type).toBe('directory');
    });
  });

  it('round-trips through readTar: paths, types, link targets and binary xattrs', async () => {
    await withFs(images.get('ext3-1k-256')!, async (fs) => {
      const byPath = new Map<string, ExtEntry>();
      for await (const e of fs.walk()) byPath.set(e.path.toString('latin1'), e);
      const ours = ourTar(fs);
      let count = 0;
      await readTar(ours.stream, 'our tar', async (h) => {
        const e = byPath.get(h.path.toString('latin1'))!;
        expect(e, h.path.toString()).toBeDefined();
        count++;
        if (h.type !== 'hardlink') expect(h.type).toBe(e.type);
        if (h.type === 'symlink') expect(h.linkname.equals(e.symlinkTarget!)).toBe(true);
        expect([h.mode, h.uid, h.gid, h.mtimeNs]).toEqual([e.mode, e.uid, e.gid, e.mtimeNs]);
        expect([...h.xattrs]).toEqual([...e.xattrs]);
      });
      await ours.done;
      expect(count).toBe(byPath.size - 1);
    });
  });

  it('reads a file system that needs recovery without replaying its journal (like -o ro,noload)', async () => {
    const img = join(tmp, 'needs-recovery.img');
    await copyFile(images.get('ext4-4k-256')!, img);
    await execa('debugfs', ['-w', '-R', 'feature needs_recovery', img]);
    const kernel = await kernelManifest(img);
    await withFs(img, async (fs) => {
      expect(fs.info.features).toContain('needs_recovery');
      const ours = ourTar(fs);
      const [manifest] = await Promise.all([manifestFromTar(ours.stream, 'our tar'), ours.done]);
      expect(compareManifests(kernel, manifest, { includeRoot: true })).toEqual([]);
    });
  });

  it('stops a walk when the signal aborts', async () => {
    await withFs(images.get('ext4-4k-256')!, async (fs) => {
      const ac = new AbortController();
      let n = 0;
      await expect((async () => {
        for await (const e of fs.walk({ signal: ac.signal })) if (e && ++n === 100) ac.abort();
      })()).rejects.toThrow(/interrupted/);
      expect(n).toBe(100);
    });
  });
});

describe('files larger than 4 GiB', () => {
  it.each([
    { name: 'huge-ext4', type: 'ext4', blockSize: 4096, inodeSize: 256 },
    { name: 'huge-ext3-1k', type: 'ext3', blockSize: 1024, inodeSize: 128 },
  ] as ImageSpec[])('$name: a 5 GiB sparse file reads like the kernel reads it', async (spec) => {
    const dir = join(tmp, spec.name);
    await mkdir(dir);
    const fh = await open(join(dir, 'huge'), 'w');
    await fh.write(Buffer.from('middle of a 5 GiB file\n'), 0, 23, 2.5 * 2 ** 30);
    await fh.write(Buffer.from('end\n'), 0, 4, 5 * 2 ** 30 - 4);
    await fh.close();
    await writeFile(join(dir, 'small'), 'small\n');
    const img = await makeImage({ ...spec, sizeMiB: 64 }, dir, tmp, false);
    await withFs(img, async (fs) => {
      const huge = (await fs.lookup('huge'))!;
      expect(huge.size).toBe(5 * 2 ** 30);
      await expectSameBytesAsGnuTar(img, fs);
    });
  });
});

describe('64 KiB blocks', () => {
  it('read the same tree as 4 KiB blocks (this kernel cannot mount them to compare)', async () => {
    const img = await makeImage({ name: 'ext4-64k', type: 'ext4', blockSize: 65536, inodeSize: 256, sizeMiB: 512, extra: ['-N', '20000'] }, content, tmp);
    const manifestOf = (path: string) => withFs(path, async (fs) => {
      expect(fs.info.blockSize).toBe(path === img ? 65536 : 4096);
      const ours = ourTar(fs);
      const [manifest] = await Promise.all([manifestFromTar(ours.stream, 'our tar'), ours.done]);
      return manifest;
    });
    const [big, reference] = await Promise.all([manifestOf(img), manifestOf(images.get('ext4-4k-256')!)]);
    expect(compareManifests(reference, big, { ignore: (p) => p.startsWith('lost+found') || p.startsWith('kernel') })).toEqual([]);
  });
});

describe('extended attributes in their own inodes (ea_inode)', () => {
  it('reads a 20 KiB value the way the kernel does', async () => {
    const dir = join(tmp, 'ea-content');
    await mkdir(dir);
    await writeFile(join(dir, 'file'), 'has a huge xattr\n');
    const img = await makeImage({ name: 'ea_inode', type: 'ext4', blockSize: 4096, inodeSize: 256, features: ['ea_inode'], sizeMiB: 32 }, dir, tmp, false);
    // Only the kernel writes values larger than a block (mke2fs -d copies from a host file system).
    await withMount(img, (mnt) => execa('setfattr', ['-n', 'user.huge', '-v', `0x${pattern(20_000, 3).toString('hex')}`, join(mnt, 'file')]), true);
    const kernel = await kernelManifest(img);
    expect(kernel.get('file')!.xattrs['user.huge']).toBe(pattern(20_000, 3).toString('hex'));
    await withFs(img, async (fs) => {
      const ours = ourTar(fs);
      const [manifest] = await Promise.all([manifestFromTar(ours.stream, 'our tar'), ours.done]);
      expect(compareManifests(kernel, manifest, { includeRoot: true })).toEqual([]);
    });
  });
});

describe('odd but valid inode fields', () => {
  it('nanoseconds ≥ 10⁹ read as whole seconds, and i_extra_isize 0 as the kernel reads it', async () => {
    const dir = join(tmp, 'odd-inodes');
    await mkdir(dir);
    await writeFile(join(dir, 'invalid-ns'), 'odd time\n');
    await writeFile(join(dir, 'no-extra'), 'no extra fields\n');
    await execa('setfattr', ['-n', 'user.hidden', '-v', 'in-inode', join(dir, 'no-extra')]);
    const img = await makeImage({ name: 'odd-inodes', type: 'ext4', blockSize: 4096, inodeSize: 256, sizeMiB: 16 }, dir, tmp, false);
    const cmds = [
      'sif /invalid-ns mtime_lo 1600000000', 'sif /invalid-ns mtime_extra 0xfffffffc',
      // With i_extra_isize 0 the kernel still reads the extra time fields, but no in-inode xattrs.
      'sif /no-extra mtime_extra 0x1dcd6500', 'sif /no-extra extra_isize 0',
    ];
    await execa('debugfs', ['-w', '-f', '-', img], { input: cmds.join('\n') });
    const kernel = await kernelManifest(img);
    expect(kernel.get('invalid-ns')!.mtimeNs % 1_000_000_000n).toBe(0n);
    expect(kernel.get('no-extra')!.mtimeNs % 1_000_000_000n).toBe(125_000_000n);
    expect(kernel.get('no-extra')!.xattrs).toEqual({});
    await withFs(img, async (fs) => {
      const ours = ourTar(fs);
      const [manifest] = await Promise.all([manifestFromTar(ours.stream, 'our tar'), ours.done]);
      expect(compareManifests(kernel, manifest, { includeRoot: true })).toEqual([]);
    });
  });
});

describe('corrupt images end in an InputError naming the image', () => {
  let base: string;
  let base1k: string;
  beforeAll(() => {
    base = images.get('ext4-4k-256')!;
    base1k = images.get('ext2-1k-128')!;
  });

  async function corrupt(from: string, name: string, edit: (img: string) => Promise<void>): Promise<string> {
    const img = join(tmp, `${name}.img`);
    await copyFile(from, img);
    await edit(img);
    return img;
  }

  async function poke(img: string, offset: number, bytes: Buffer): Promise<void> {
    const fh = await open(img, 'r+');
    try {
      await fh.write(bytes, 0, bytes.length, offset);
    } finally {
      await fh.close();
    }
  }

  async function debugfs(img: string, cmd: string): Promise<string> {
    return (await execa('debugfs', ['-R', cmd, img])).stdout;
  }

  /** Byte offset of an inode in the image, from debugfs imap. */
  async function inodeOffset(img: string, path: string, blockSize: number): Promise<number> {
    const m = /located at block (\d+), offset 0x([0-9a-f]+)/.exec(await debugfs(img, `imap ${path}`))!;
    return Number(m[1]) * blockSize + parseInt(m[2]!, 16);
  }

  /** Byte offset of a directory's logical block 0. */
  async function dirBlockOffset(img: string, path: string, blockSize: number): Promise<number> {
    return Number((await debugfs(img, `bmap ${path} 0`)).trim()) * blockSize;
  }

  /** Offset of `name`'s record in a directory block (the record header is 8 bytes before the name). */
  async function recordOffset(img: string, dirPath: string, name: string, blockSize: number): Promise<number> {
    const at = await dirBlockOffset(img, dirPath, blockSize);
    const block = (await readFile(img)).subarray(at, at + blockSize);
    const i = block.indexOf(Buffer.from(name));
    expect(i).toBeGreaterThan(8);
    return at + i - 8;
  }

  async function walkAll(img: string): Promise<void> {
    await withFs(img, async (fs) => {
      for await (const e of fs.walk()) expect(e.path).toBeInstanceOf(Buffer);
    });
  }

  async function packAll(img: string): Promise<void> {
    await withFs(img, async (fs) => {
      const ours = ourTar(fs);
      // The error reaches `done`; the stream's own 'error' event needs a listener too.
      ours.stream.on('error', () => undefined).resume();
      await ours.done;
    });
  }

  async function expectInputError(p: Promise<unknown>, img: string, pattern: RegExp): Promise<void> {
    const err = await p.then(() => undefined, (e: unknown) => e);
    expect(err).toBeInstanceOf(InputError);
    expect((err as InputError).message).toContain(img);
    expect((err as InputError).message).toMatch(pattern);
  }

  it('superblock magic', async () => {
    const img = await corrupt(base, 'bad-magic', (i) => poke(i, 1024 + 0x38, Buffer.from([0x53, 0xee])));
    await expectInputError(withFs(img, async () => undefined), img, /s_magic is 0xee53/);
  });

  it('unsupported and unknown incompatible features', async () => {
    const setIncompat = (bits: number) => async (img: string) => {
      const sb = Buffer.from(await readFile(img).then((b) => b.subarray(1024, 2048)));
      await poke(img, 1024 + 0x60, Buffer.from(Uint32Array.of(sb.readUInt32LE(0x60) | bits).buffer));
    };
    const enc = await corrupt(base, 'encrypt', setIncompat(0x10000));
    await expectInputError(withFs(enc, async () => undefined), enc, /encrypt/);
    const unknown = await corrupt(base, 'unknown-feature', setIncompat(0x80000000));
    await expectInputError(withFs(unknown, async () => undefined), unknown, /incompat_0x80000000/);
  });

  it('an image cut short', async () => {
    const img = await corrupt(base, 'truncated', async (i) => {
      const fh = await open(i, 'r+');
      await fh.truncate(20 << 20);
      await fh.close();
    });
    await expectInputError(withFs(img, async () => undefined), img, /exceeds the \d+-byte image/);
  });

  it('an extent header', async () => {
    const img = await corrupt(base, 'bad-extent-header', async (i) => {
      await poke(i, (await inodeOffset(i, '/files/one-mib', 4096)) + 0x28, Buffer.from([0, 0]));
    });
    await walkAll(img);
    await expectInputError(packAll(img), img, /inode \d+: extent tree root in i_block: eh_magic is 0x0/);
  });

  it('an extent index pointing at a block already in the tree', async () => {
    const img = await corrupt(base, 'extent-loop', async (i) => {
      const root = (await inodeOffset(i, '/sparse/fragmented', 4096)) + 0x28;
      const iblock = (await readFile(i)).subarray(root, root + 60);
      expect(iblock.readUInt16LE(6)).toBe(1);
      expect(iblock.readUInt16LE(2)).toBeGreaterThan(1);
      // Second index entry's ei_leaf_lo := the first's.
      await poke(i, root + 24 + 4, iblock.subarray(16, 20));
    });
    await expectInputError(packAll(img), img, /already part of the tree/);
  });

  it("an inode's size", async () => {
    const img = await corrupt(base, 'bad-size', async (i) => {
      await poke(i, (await inodeOffset(i, '/files/small.txt', 4096)) + 0x6c, Buffer.from([0xff, 0xff, 0xff, 0xff]));
    });
    await expectInputError(walkAll(img), img, /i_size \d+ exceeds/);
    const extra = await corrupt(base, 'bad-extra-isize', async (i) => {
      await poke(i, (await inodeOffset(i, '/files/small.txt', 4096)) + 0x80, Buffer.from([0x02, 0x01]));
    });
    await expectInputError(walkAll(extra), extra, /i_extra_isize 258/);
  });

  it('a directory record', async () => {
    const img = await corrupt(base, 'bad-rec-len', async (i) => {
      await poke(i, (await recordOffset(i, '/names', 'with space', 4096)) + 4, Buffer.from([0x03, 0x00]));
    });
    await expectInputError(walkAll(img), img, /rec_len 3/);
    const slash = await corrupt(base, 'slash-in-name', async (i) => {
      await poke(i, (await recordOffset(i, '/names', 'with space', 4096)) + 8 + 4, Buffer.from('/'));
    });
    await expectInputError(walkAll(slash), slash, /contains "\/" or NUL/);
    const dots = await corrupt(base, 'misplaced-dotdot', async (i) => {
      const at = await recordOffset(i, '/names', '-dash', 4096);
      await poke(i, at + 6, Buffer.from([2]));
      await poke(i, at + 8, Buffer.from('..'));
    });
    await expectInputError(walkAll(dots), dots, /"\.\." entry out of place/);
  });

  it('a directory listing the same block twice', async () => {
    const img = await corrupt(base1k, 'dir-block-twice', async (i) => {
      const at = (await inodeOffset(i, '/big', 1024)) + 0x28;
      await poke(i, at + 4, (await readFile(i)).subarray(at, at + 4));
    });
    await expectInputError(walkAll(img), img, /directory inode \d+ uses block \d+ twice/);
  });

  it('a directory cycle', async () => {
    const img = await corrupt(base, 'dir-cycle', async (i) => {
      const deepIno = Number(/Inode: (\d+)/.exec(await debugfs(i, 'stat /deep'))![1]);
      await poke(i, await recordOffset(i, '/deep/level-01', 'level-02', 4096), Buffer.from(Uint32Array.of(deepIno).buffer));
    });
    await expectInputError(walkAll(img), img, /reached a second time/);
  });

  it('a block pointer beyond the file system', async () => {
    const img = await corrupt(base1k, 'bad-block-pointer', async (i) => {
      await poke(i, (await inodeOffset(i, '/files/one-mib', 1024)) + 0x28 + 4 * 13, Buffer.from([0xf0, 0xff, 0xff, 0x0f]));
    });
    await expectInputError(packAll(img), img, /level-2 indirect block: block \d+ lies outside the file system/);
  });

  it('an xattr block', async () => {
    const img = await corrupt(base, 'bad-xattr-block', async (i) => {
      const block = Number(/File ACL: (\d+)/.exec(await debugfs(i, 'stat /xattrs/large'))![1]);
      await poke(i, block * 4096, Buffer.from([0, 0, 0, 0]));
    });
    await expectInputError(walkAll(img), img, /h_magic is 0x0/);
  });
});
