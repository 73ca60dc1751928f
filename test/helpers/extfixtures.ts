import { createServer } from 'node:net';
import { link, mkdir, mkdtemp, open, rm, symlink, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { PassThrough, type Readable } from 'node:stream';
import { execa } from 'execa';

/**
 * ext2/3/4 fixtures made by real tools: a content tree with every kind of node the reader must
 * handle, `mke2fs -d` images of it, and the kernel's loop mount plus GNU tar as the oracle.
 */

const C = { env: { LC_ALL: 'C' } };

/** Deterministic bytes (an LCG), so fixture contents are reproducible. */
export function pattern(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}

async function writeAt(path: string, chunks: [number, Buffer][], size?: number): Promise<void> {
  const fh = await open(path, 'w');
  try {
    for (const [pos, data] of chunks) await fh.write(data, 0, data.length, pos);
    if (size !== undefined) await fh.truncate(size);
  } finally {
    await fh.close();
  }
}

/** A unix socket node that outlives its server (Node unlinks the name it bound on close). */
async function makeSocket(path: string): Promise<void> {
  const bound = `${path}.bound`;
  const server = createServer();
  await new Promise<void>((resolve, reject) => server.once('error', reject).listen(bound, resolve));
  await link(bound, path);
  await new Promise<void>((resolve) => server.close(() => resolve()));
}

/** POSIX ACL xattr (version 2): owner rwx, user 1000 r-x, group r-x, mask r-x, other r--. */
/** A POSIX ACL in the xattr form getfacl writes (user 1000 r-x, mask r-x). */
export function aclValue(): Buffer {
  const entries: [number, number, number][] = [
    [0x01, 7, 0xffffffff], [0x02, 5, 1000], [0x04, 5, 0xffffffff], [0x10, 5, 0xffffffff], [0x20, 4, 0xffffffff],
  ];
  const b = Buffer.alloc(4 + 8 * entries.length);
  b.writeUInt32LE(2, 0);
  entries.forEach(([tag, perm, id], i) => {
    b.writeUInt16LE(tag, 4 + i * 8);
    b.writeUInt16LE(perm, 6 + i * 8);
    b.writeUInt32LE(id, 8 + i * 8);
  });
  return b;
}

export interface ContentOptions {
  /** Names in the big (htree) directory. */
  bigDir?: number;
  /** Levels of the deep directory chain. */
  depth?: number;
  /** Add a 5 GiB sparse file with data in the middle and at the end. */
  huge?: boolean;
}

export const ODD_NAMES = [
  'with space', 'new\nline', 'tab\there', 'ütf-8 ✓ 日本', 'a;b&c|d$(e)`f`', `quote'"`, '*?[x]', '-dash', 'back\\slash',
  'n'.repeat(255), `${'é'.repeat(127)}x`, '.hidden', '..dots', '~tilde', '#hash', '%25', 'eq=sign',
];

/** Build the content tree that every image in the matrix is made from. */
export async function makeContentTree(root: string, opts: ContentOptions = {}): Promise<void> {
  const p = (...parts: string[]) => join(root, ...parts);
  await mkdir(root, { recursive: true });
  for (const d of ['etc', 'empty-dir', 'files', 'sparse', 'big', 'names', 'modes', 'owners', 'links', 'dev', 'xattrs', 'times']) {
    await mkdir(p(d));
  }
  await writeFile(p('etc/os-release'), 'NAME="Fixture Linux"\nID=fixture\nVERSION_ID="1.0"\n');
  await writeFile(p('empty-file'), '');

  await writeFile(p('files/small.txt'), 'hello, world\n');
  for (const n of [59, 60, 150, 1000]) await writeFile(p(`files/bytes-${n}`), pattern(n, n));
  for (const n of [12, 13]) await writeFile(p(`files/blocks4k-${n}`), pattern(n * 4096, n));
  await writeFile(p('files/one-mib'), pattern(1 << 20, 7));
  await writeFile(p('files/odd-size'), pattern(300_001, 11));

  await writeAt(p('sparse/holes'), [[0, pattern(4096, 1)], [1 << 20, pattern(5000, 2)], [10 << 20, pattern(100, 3)]]);
  await writeAt(p('sparse/tail-hole'), [[0, pattern(4096, 4)]], 3 << 20);
  await writeAt(p('sparse/all-hole'), [], 2 << 20);
  // Past 64 MiB + 268 KiB: triple indirect with 1 KiB blocks.
  await writeAt(p('sparse/triple-indirect'), [[70 << 20, pattern(3000, 5)]]);
  // 800 separate extents: an extent tree of depth 1 (4 KiB blocks) or 2 (1 KiB blocks).
  await writeAt(p('sparse/fragmented'), Array.from({ length: 800 }, (_, i) => [i * 8192, pattern(4096, 100 + i)] as [number, Buffer]));
  if (opts.huge) {
    await writeAt(p('sparse/huge'), [[2.5 * 2 ** 30, Buffer.from('middle of a 5 GiB file\n')], [5 * 2 ** 30 - 4, Buffer.from('end\n')]]);
  }

  const big = opts.bigDir ?? 5000;
  for (let i = 0; i < big; i++) {
    const name = p('big', `entry-${String(i).padStart(5, '0')}${'x'.repeat(i % 40)}`);
    if (i % 500 === 0) await mkdir(name);
    else await writeFile(name, i % 100 === 0 ? `${i}\n` : '');
  }

  let deep = p('deep');
  for (let i = 1; i <= (opts.depth ?? 60); i++) deep = join(deep, `level-${String(i).padStart(2, '0')}`);
  await mkdir(deep, { recursive: true });
  await writeFile(join(deep, 'leaf.txt'), 'at the bottom\n');

  for (const n of ODD_NAMES) await writeFile(p('names', n), `${n}\n`);
  await writeFile(Buffer.from([...Buffer.from(p('names')), 0x2f, 0x6e, 0xff, 0xfe, 0x80]), 'not UTF-8\n');

  const modes: [string, number][] = [['setuid', 0o4755], ['setgid', 0o2755], ['none', 0o000], ['all', 0o777], ['odd', 0o6501]];
  for (const [n, m] of modes) {
    await writeFile(p('modes', n), n);
    await execa('chmod', [m.toString(8), p('modes', n)]);
  }
  await mkdir(p('modes/sticky'));
  await execa('chmod', ['1777', p('modes/sticky')]);
  await mkdir(p('modes/setgid-dir'));
  await execa('chmod', ['2775', p('modes/setgid-dir')]);

  for (const [n, uid, gid] of [['user', 1000, 1000], ['nobody', 65534, 65534], ['high', 70000, 70001], ['huge', 3_000_000, 3_000_001]] as const) {
    await writeFile(p('owners', n), n);
    await execa('chown', ['-h', `${uid}:${gid}`, p('owners', n)]);
  }

  await writeFile(p('links/target-file'), 'target\n');
  await symlink('target-file', p('links/fast'));
  await symlink('s'.repeat(59), p('links/fast-59'));
  await symlink('s'.repeat(60), p('links/slow-60'));
  await symlink('x/'.repeat(100), p('links/slow-200'));
  await symlink('y'.repeat(900), p('links/slow-900'));
  await symlink('/etc/os-release', p('links/absolute'));
  await symlink('does/not/exist', p('links/dangling'));
  await symlink('../etc', p('links/up'));
  await symlink('ütf-8 ✓', p('links/utf8'));
  await writeFile(p('links/hard-a'), 'linked three times\n');
  await link(p('links/hard-a'), p('links/hard-b'));
  await link(p('links/hard-a'), p('files/hard-c'));
  await symlink('target-file', p('links/hard-sym-1'));
  await link(p('links/hard-sym-1'), p('links/hard-sym-2'));

  await execa('mknod', [p('dev/null'), 'c', '1', '3']);
  await execa('mknod', [p('dev/sda1'), 'b', '8', '1']);
  await execa('mknod', [p('dev/wide'), 'c', '300', '70000']);
  await execa('mkfifo', [p('dev/fifo')]);
  await makeSocket(p('dev/socket'));

  const setfattr = (path: string, name: string, value: Buffer, noDeref = false) =>
    execa('setfattr', [...(noDeref ? ['-h'] : []), '-n', name, '-v', `0x${value.toString('hex')}`, path]);
  await writeFile(p('xattrs/user'), 'user xattrs\n');
  await setfattr(p('xattrs/user'), 'user.plain', Buffer.from('value'));
  await setfattr(p('xattrs/user'), 'user.binary', Buffer.from([0, 0xff, 0x0a, 0x3d, 0x25]));
  await setfattr(p('xattrs/user'), 'user.empty-ish', Buffer.from(' '));
  await writeFile(p('xattrs/trusted'), 'trusted\n');
  await setfattr(p('xattrs/trusted'), 'trusted.secret', Buffer.from('only root sees this'));
  await writeFile(p('xattrs/cap'), pattern(2000, 42));
  await execa('setcap', ['cap_net_raw,cap_net_admin+ep', p('xattrs/cap')]);
  await writeFile(p('xattrs/large'), 'one large value\n');
  await setfattr(p('xattrs/large'), 'user.large', pattern(900, 9));
  await writeFile(p('xattrs/many'), 'many values\n');
  for (let i = 0; i < 20; i++) await setfattr(p('xattrs/many'), `user.k${i}`, Buffer.from(`v${i}`.repeat(3)));
  await writeFile(p('xattrs/acl'), 'acl\n');
  await setfattr(p('xattrs/acl'), 'system.posix_acl_access', aclValue());
  await mkdir(p('xattrs/dir'));
  await setfattr(p('xattrs/dir'), 'user.on-a-dir', Buffer.from('yes'));
  await symlink('user', p('xattrs/symlink'));
  await setfattr(p('xattrs/symlink'), 'trusted.on-a-symlink', Buffer.from('yes'), true);
  await writeFile(p('xattrs/odd-name'), 'odd xattr name\n');
  await setfattr(p('xattrs/odd-name'), 'user.a=b%c', Buffer.from('x'));

  for (const n of Object.keys(TIMES)) if (n.startsWith('times/') && n !== 'times/symlink') await writeFile(p(n), n);
  await symlink('nanoseconds', p('times/symlink'));
}

/**
 * Timestamps stamped into images with debugfs (mke2fs -d keeps whole seconds only): base
 * seconds and, with large inodes, the raw extra word (2 epoch bits, 30 bits of nanoseconds).
 */
const TIMES: Record<string, [seconds: number, nanoseconds: number]> = {
  times: [1_000_000_000, 500_000_000],
  'deep/level-01': [1_000_000_001, 250_000_000],
  'times/nanoseconds': [1_577_934_245, 123_456_789],
  'times/one-ns': [1_600_000_000, 1],
  'times/before-1970': [-2, 500_000_000],
  'times/epoch': [0, 0],
  'times/year-2100': [4_102_444_800, 500_000_000],
  'times/year-2038': [2_147_483_648, 0],
  'times/symlink': [1_234_567_890, 987_654_321],
};

async function stampTimes(img: string, largeInodes: boolean): Promise<void> {
  const cmds: string[] = [];
  for (const [path, [sec, ns]] of Object.entries(TIMES)) {
    const low = ((sec % 2 ** 32) + 2 ** 32) % 2 ** 32;
    cmds.push(`sif /${path} mtime_lo ${low}`);
    if (!largeInodes) continue;
    const epoch = (sec - (low >= 2 ** 31 ? low - 2 ** 32 : low)) / 2 ** 32;
    cmds.push(`sif /${path} mtime_extra ${(ns * 4 + (epoch & 3)) >>> 0}`);
  }
  await execa('debugfs', ['-w', '-f', '-', img], { ...C, input: cmds.join('\n') });
}

export interface ImageSpec {
  name: string;
  type: 'ext2' | 'ext3' | 'ext4';
  blockSize?: 1024 | 4096 | 65536;
  inodeSize?: 128 | 256;
  /** mke2fs -O list, e.g. ['inline_data', '^has_journal']. */
  features?: string[];
  /** Extra mke2fs arguments. */
  extra?: string[];
  sizeMiB?: number;
}

/**
 * `mke2fs -d`: an image of `content` (a sparse file; mke2fs keeps holes), directories indexed by
 * `e2fsck -D`, then, for trees made by makeContentTree (`stamp`), exact timestamps written with
 * debugfs.
 */
export async function makeImage(spec: ImageSpec, content: string, dir: string, stamp = true): Promise<string> {
  const img = join(dir, `${spec.name}.img`);
  await rm(img, { force: true });
  await writeFile(img, '');
  await truncate(img, (spec.sizeMiB ?? 96) * 2 ** 20);
  const args = ['-F', '-q', '-t', spec.type, '-E', 'lazy_itable_init=1,root_owner=0:0', '-U', 'clear'];
  if (spec.blockSize) args.push('-b', String(spec.blockSize));
  if (spec.inodeSize) args.push('-I', String(spec.inodeSize));
  if (spec.features?.length) args.push('-O', spec.features.join(','));
  args.push(...(spec.extra ?? []), '-d', content, img);
  await execa('mke2fs', args, C);
  // mke2fs -d writes linear directories; e2fsck -D indexes the large ones (htree), as the kernel would.
  const fsck = await execa('e2fsck', ['-f', '-y', '-D', img], { ...C, reject: false });
  if (fsck.exitCode !== 0 && fsck.exitCode !== 1) throw new Error(`e2fsck -D ${img} failed (${fsck.exitCode}): ${fsck.stdout}`);
  if (stamp) await stampTimes(img, (spec.inodeSize ?? 256) > 128);
  return img;
}

/**
 * Mount an image read-only without journal replay (or read-write, to let the kernel write
 * something), run `fn`, always unmount. The ext4 driver serves all three types, so ext2 images
 * show what is on disk (nanoseconds, in-inode xattrs), which the standalone ext2 driver drops.
 */
export async function withMount<T>(img: string, fn: (dir: string) => Promise<T>, writable = false): Promise<T> {
  const dir = await mkdtemp(join(img, '..', 'mnt-'));
  await execa('mount', ['-t', 'ext4', '-o', writable ? 'loop' : 'loop,ro,noload', img, dir]);
  try {
    return await fn(dir);
  } finally {
    await execa('umount', [dir]);
    await rm(dir, { recursive: true, force: true });
  }
}

/** GNU tar as the brief's oracle: every attribute, sorted names. */
export const KERNEL_TAR_ARGS = ['--numeric-owner', '--xattrs', '--xattrs-include=*', '--format=posix', '--sort=name'];
/** GNU tar as the host engine runs it: no atime/ctime, stable pax header names. */
export const HOST_TAR_ARGS = [...KERNEL_TAR_ARGS, '--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime'];

/**
 * GNU tar of a directory; `members` replaces the usual "." (names are then without "./").
 * The output is drained to the end even when the consumer stops at the end-of-archive marker,
 * so tar never dies of a broken pipe while writing its final padding.
 */
export function gnuTar(dir: string, args: string[], members: string[] = ['.']): { stream: Readable; done: Promise<unknown> } {
  const child = execa('tar', [...args, '-C', dir, '-cf', '-', ...members], { ...C, buffer: { stdout: false }, encoding: 'buffer' });
  const src = child.stdout as Readable;
  const out = new PassThrough();
  src.on('data', (chunk: Buffer) => {
    if (!out.destroyed && !out.write(chunk)) {
      src.pause();
      out.once('drain', () => src.resume());
    }
  });
  src.on('end', () => out.end());
  out.on('close', () => src.resume());
  return { stream: out, done: child };
}

export async function makeTemp(prefix: string): Promise<string> {
  return mkdtemp(join(process.env.TMPDIR ?? '/tmp', prefix));
}
