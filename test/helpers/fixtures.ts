import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rename, rm, rmdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import lockfile from 'proper-lockfile';

const REPO = fileURLToPath(new URL('../../', import.meta.url));
const SCRIPT = join(REPO, 'scripts/make-fixture');
const CACHE = join(REPO, '.fixtures');
const STALE_MS = 30_000;

/** scripts/make-fixture's options; every one has the script's default when left out. */
export interface FixtureOptions {
  fs?: 'ext3' | 'ext4';
  payload?: 'raw' | 'vhd-fixed' | 'vhd-dynamic';
  diskSize?: number;
  startSector?: number;
  rootSize?: number;
  label?: string;
  /** Copied into the root file system. Only its path is part of the cache key, not its content. */
  extraDir?: string;
  gzipLevel?: number;
}

export interface FixturePartition {
  index: number;
  startSector: number;
  sizeBytes: number;
  /** MBR partition type, hex: "83" Linux, "82" swap. */
  type: string;
}

/** OUT.json as written by scripts/make-fixture, plus where the work products are. */
export interface FixtureInfo {
  iso: string;
  payload: 'raw' | 'vhd-fixed' | 'vhd-dynamic';
  fs: 'ext3' | 'ext4';
  /** Raw disk size: whole sectors. */
  diskSize: number;
  /** ova.xml's vdi size: the (virtual) disk size. */
  vdiSize: number;
  /** Size of the stream the chunks carry: the raw disk or the VHD file. */
  streamSize: number;
  /** Chunk numbers present in the ISO. */
  chunks: number[];
  /** Chunk numbers left out because all their bytes are zero. */
  leftOut: number[];
  partitions: FixturePartition[];
  rootPartition: number;
  /** Size of the root file system (a whole number of 4 KiB blocks, ≤ its partition). */
  rootFsBytes: number;
  label: string;
  redhatRelease: string;
  /** The --keep directory: rootfs/ (the source tree), disk.raw, disk.vhd (VHD payloads), iso/. */
  dir: string;
  /** The raw disk image. */
  disk: string;
  /** The file the chunks were cut from: disk.raw, or disk.vhd for VHD payloads. */
  stream: string;
}

const OPTION_FLAGS: Record<keyof FixtureOptions, string> = {
  fs: '--fs',
  payload: '--payload',
  diskSize: '--disk-size',
  startSector: '--start-sector',
  rootSize: '--root-size',
  label: '--label',
  extraDir: '--extra-dir',
  gzipLevel: '--gzip-level',
};

function optionArgs(opts: FixtureOptions): string[] {
  const args: string[] = [];
  for (const key of Object.keys(OPTION_FLAGS).sort() as (keyof FixtureOptions)[]) {
    const value = opts[key];
    if (value !== undefined) args.push(OPTION_FLAGS[key], String(value));
  }
  return args;
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(() => true, () => false);
}

/** Runs fn while holding a lock next to path, shared with other test processes (and engineers). */
async function withLock<T>(path: string, fn: () => Promise<T>): Promise<T> {
  await mkdir(CACHE, { recursive: true });
  const release = await lockfile.lock(path, {
    realpath: false,
    lockfilePath: `${path}.lock`,
    stale: STALE_MS,
    // A build takes well under a minute; wait up to 5 minutes for another process's.
    retries: { retries: 600, factor: 1, minTimeout: 500, maxTimeout: 500 },
  });
  try {
    return await fn();
  } finally {
    await release();
  }
}

async function load(dir: string): Promise<FixtureInfo> {
  const json = JSON.parse(await readFile(join(dir, 'ddk.iso.json'), 'utf8')) as Omit<FixtureInfo, 'dir' | 'disk' | 'stream'>;
  const disk = join(dir, 'disk.raw');
  // Paths are recomputed: the cache may have been built from another checkout's path.
  return { ...json, iso: join(dir, 'ddk.iso'), dir, disk, stream: json.payload === 'raw' ? disk : join(dir, 'disk.vhd') };
}

/** Removes builds of the same options by older versions of the script, unless in use (locked). */
async function pruneStale(prefix: string, keep: string): Promise<void> {
  for (const name of await readdir(CACHE)) {
    const path = join(CACHE, name);
    if (!name.startsWith(prefix) || name.endsWith('.lock') || path === keep) continue;
    if (await lockfile.check(path, { realpath: false, lockfilePath: `${path}.lock`, stale: STALE_MS })) continue;
    await rm(path, { recursive: true, force: true });
  }
}

/**
 * A DDK-like ISO built by scripts/make-fixture, cached under .fixtures/ by options and by the
 * script's content (editing the script rebuilds). Needs root.
 */
export async function buildFixture(opts: FixtureOptions = {}): Promise<FixtureInfo> {
  const args = optionArgs(opts);
  const hash = (data: string | Buffer) => createHash('sha256').update(data).digest('hex').slice(0, 12);
  const prefix = `${opts.payload ?? 'raw'}-${opts.fs ?? 'ext4'}-${hash(JSON.stringify(args))}-`;
  const dir = join(CACHE, prefix + hash(await readFile(SCRIPT)));
  // The script writes OUT.json last, so its presence means a complete build.
  if (await exists(join(dir, 'ddk.iso.json'))) return load(dir);
  return withLock(dir, async () => {
    if (!(await exists(join(dir, 'ddk.iso.json')))) {
      await pruneStale(prefix, dir);
      await rm(dir, { recursive: true, force: true });
      try {
        await execa(SCRIPT, ['--out', join(dir, 'ddk.iso'), '--keep', dir, ...args]);
      } catch (err) {
        await rm(dir, { recursive: true, force: true });
        throw err;
      }
    }
    return load(dir);
  });
}

/**
 * The kernel's view of the fixture's root file system as a POSIX tar (numeric owners, all xattrs,
 * sorted names): the oracle for the readers. Built once per fixture from a read-only loop mount
 * (`noload`: no journal replay, so the disk stays untouched) and cached beside it.
 */
export async function rootOracleTar(info: FixtureInfo): Promise<string> {
  const tar = join(info.dir, 'root.tar');
  if (await exists(tar)) return tar;
  return withLock(tar, async () => {
    if (await exists(tar)) return tar;
    const part = info.partitions.find((p) => p.index === info.rootPartition);
    if (!part) throw new Error(`${info.iso}: no partition ${info.rootPartition} in its description`);
    const partial = `${tar}.partial`;
    const { stdout } = await execa('losetup', ['--find', '--show', '--read-only', '--offset', String(part.startSector * 512),
      '--sizelimit', String(part.sizeBytes), info.disk]);
    const loop = stdout.trim();
    try {
      const mnt = await mkdtemp('/tmp/oracle-');
      try {
        await execa('mount', ['-t', info.fs, '-o', 'ro,noload', loop, mnt]);
        try {
          await execa('tar', ['--numeric-owner', '--xattrs', '--xattrs-include=*', '--format=posix', '--sort=name',
            '-C', mnt, '-cf', partial, '.']);
        } finally {
          await execa('umount', [mnt]);
        }
      } finally {
        await rmdir(mnt);
      }
    } catch (err) {
      await rm(partial, { force: true });
      throw err;
    } finally {
      await execa('losetup', ['-d', loop]);
    }
    await rename(partial, tar);
    return tar;
  });
}
