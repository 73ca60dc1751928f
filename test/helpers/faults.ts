import { copyFile, mkdir, mkdtemp, readFile, rmdir, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { execa } from 'execa';
import { expect } from 'vitest';
import { CLI } from './cli.js';

/**
 * A DDK-like ISO small enough to build in a test's beforeAll (about a second): a 16 MiB raw disk
 * with an MBR and one ext4 partition (no metadata_csum, so patched structures reach the readers'
 * own checks rather than a checksum test), its one gzip chunk, ova.xml, and the ISO around them.
 * The fault, interruption, concurrency and security tests damage or decorate it.
 */
export interface MiniDdk {
  /** The file tree the root file system was made from. */
  tree: string;
  /** The raw disk image (a valid SOURCE by itself). */
  disk: string;
  /** The ISO's content: ddk/ova.xml and ddk/xvda/chunk-000000000.gz. */
  isoTree: string;
  iso: string;
  /** Byte offset of the root partition (and its ext4) in the disk. */
  partOffset: number;
  diskSize: number;
}

export const PART_OFFSET = 1 << 20;
const DISK_SIZE = 16 << 20;

export function ovaXml(size: number): string {
  return `<?xml version="1.0" ?><appliance version="0.1"><vm name="mini"><label>mini DDK</label><vbd device="xvda" function="root" vdi="vdi_xvda" mode="w"/></vm><vdi name="vdi_xvda" size="${size}" source="file://xvda" type="dir-gzipped-chunks" variety="system"/></appliance>\n`;
}

export async function isoFrom(tree: string, out: string): Promise<void> {
  await execa('xorriso', ['-as', 'mkisofs', '-R', '-J', '-quiet', '-o', out, tree]);
}

/** Builds the mini DDK in `dir`; `populate` adds to the root tree before mke2fs. */
export async function buildMiniDdk(dir: string, populate?: (root: string) => Promise<void>): Promise<MiniDdk> {
  const tree = join(dir, 'tree');
  for (const d of ['etc', 'bin', 'a/b']) await mkdir(join(tree, d), { recursive: true });
  // busybox: the verify stage's smoke command needs a shell and cat in the image.
  await copyFile('/bin/busybox', join(tree, 'bin/busybox'));
  await symlink('busybox', join(tree, 'bin/sh'));
  await symlink('busybox', join(tree, 'bin/cat'));
  await writeFile(join(tree, 'etc/redhat-release'), 'XenServer release 6.5.0 (mini)\n');
  await writeFile(join(tree, 'etc/os-release'), 'NAME="XenServer"\nID=xenserver\n');
  await writeFile(join(tree, 'a/b/file'), 'hello\n');
  await populate?.(tree);

  const disk = join(dir, 'disk.raw');
  await execa('truncate', ['-s', String(DISK_SIZE), disk]);
  await execa('sfdisk', ['-q', '--no-reread', '--no-tell-kernel', disk], { input: `label: dos\n1 : start=${PART_OFFSET / 512}, type=83\n` });
  const blocks = (DISK_SIZE - PART_OFFSET) / 4096;
  await execa('mke2fs', ['-q', '-F', '-t', 'ext4', '-O', '^metadata_csum', '-b', '4096', '-d', tree, '-E', `offset=${PART_OFFSET}`, disk, String(blocks)]);

  const isoTree = join(dir, 'iso');
  await mkdir(join(isoTree, 'ddk/xvda'), { recursive: true });
  await writeFile(join(isoTree, 'ddk/ova.xml'), ovaXml(DISK_SIZE));
  await writeFile(join(isoTree, 'ddk/xvda/chunk-000000000.gz'), gzipSync(await readFile(disk)));
  const iso = join(dir, 'ddk.iso');
  await isoFrom(isoTree, iso);
  return { tree, disk, isoTree, iso, partOffset: PART_OFFSET, diskSize: DISK_SIZE };
}

/** Runs `fn` on the mini disk's root file system as the kernel sees it (read-only loop mount, no journal replay). */
export async function withKernelRoot<T>(mini: MiniDdk, fn: (root: string) => Promise<T>): Promise<T> {
  const mnt = await mkdtemp('/tmp/kernel-root-');
  try {
    await execa('mount', ['-t', 'ext4', '-o', `ro,noload,loop,offset=${mini.partOffset}`, mini.disk, mnt]);
    try {
      return await fn(mnt);
    } finally {
      await execa('umount', [mnt]);
    }
  } finally {
    await rmdir(mnt);
  }
}

/** The kernel's view of the mini root file system as a POSIX tar, tarred as test/helpers/fixtures.ts rootOracleTar does. */
export async function kernelRootTar(mini: MiniDdk, out: string): Promise<void> {
  await withKernelRoot(mini, (root) =>
    execa('tar', ['--numeric-owner', '--xattrs', '--xattrs-include=*', '--format=posix', '--sort=name', '-C', root, '-cf', out, '.']),
  );
}

/** Where debugfs says an inode lives: the byte offset of the inode in the disk image. */
export async function inodeOffset(mini: MiniDdk, path: string): Promise<number> {
  const { stdout } = await execa('debugfs', ['-R', `imap ${path}`, `${mini.disk}?offset=${mini.partOffset}`]);
  const m = /located at block (\d+), offset 0x([0-9a-f]+)/.exec(stdout);
  if (!m) throw new Error(`debugfs imap ${path}: ${stdout}`);
  return mini.partOffset + Number(m[1]) * 4096 + parseInt(m[2]!, 16);
}

/** A debugfs command run writable on `disk`'s root file system. */
export async function debugfsWrite(disk: string, command: string): Promise<void> {
  await execa('debugfs', ['-w', '-R', command, `${disk}?offset=${PART_OFFSET}`]);
}

export interface BoundedResult {
  code: number;
  stdout: string;
  stderr: string;
  /** Peak resident set size of the CLI process, KiB (GNU time). */
  maxRssKiB: number;
}

const RSS_MARK = 'ddk2docker-test-maxrss';

/** Runs the CLI under GNU time for its peak RSS, with a time limit. */
export async function runBounded(args: string[], env: Record<string, string> = {}, timeoutMs = 60_000): Promise<BoundedResult> {
  const r = await execa('/usr/bin/time', ['-f', `${RSS_MARK} %M`, process.execPath, CLI, ...args], { reject: false, env, timeout: timeoutMs });
  const lines = String(r.stderr).split('\n');
  const mark = lines.findIndex((l) => l.startsWith(RSS_MARK));
  expect(mark, String(r.stderr)).toBeGreaterThanOrEqual(0);
  // GNU time says "Command exited with non-zero status N" before its own line.
  const own = lines.filter((l, i) => i !== mark && !/^Command (exited with non-zero status|terminated by signal)/.test(l));
  return { code: r.timedOut ? -1 : (r.exitCode ?? -1), stdout: String(r.stdout), stderr: own.join('\n'), maxRssKiB: Number(lines[mark]!.split(' ')[1]) };
}

/** The CLI's verdict on bad input: exit 1, nothing on stdout, one stderr line that matches. */
export function expectOneLine(r: { code: number; stdout: string; stderr: string }, message: RegExp): void {
  const lines = r.stderr.split('\n').filter(Boolean);
  expect(lines, r.stderr).toHaveLength(1);
  expect(lines[0]).toMatch(/^ddk2docker: /);
  expect(lines[0]).toMatch(message);
  expect(r.code, r.stderr).toBe(1);
  expect(r.stdout).toBe('');
}
