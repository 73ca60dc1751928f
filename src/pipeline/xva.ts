import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { throwIfAborted } from '../errors.js';
import { FileSource, type Source } from '../formats/source.js';
import { BLOCK_SIZE, openXva, type ChecksumKind, type OpenedXva } from '../formats/xva2.js';
import type { StageContext } from './stage.js';

const ZERO = Buffer.alloc(BLOCK_SIZE);

/**
 * extract and decompress for an XVA version 2 (both engines). Nothing is unpacked: the tar's
 * headers are indexed in place and the root disk's blocks are read where they lie in the .xva.
 */

/** extract: index the tar, parse ova.xml, lay out the root disk's blocks. */
export async function extractXva(ctx: StageContext, path: string, name: string): Promise<OpenedXva> {
  const src = await FileSource.open(path, name);
  ctx.cleanup.defer(`close ${name}`, () => src.close());
  return openXva(src, name);
}

/**
 * decompress: one pass over the root disk's data blocks, in tar order, checks each against its
 * checksum, so that a bad block fails the run by name before any reader sees the disk (a reader
 * probing partitions would take it for a partition that is not the root). The builtin engine then
 * reads the disk in place, the pass having warmed the page cache; the host engine's tools
 * (qemu-img, sfdisk, losetup) need a file, so the pass also writes each block at its offset into a
 * sparse raw file, left-out blocks staying holes.
 */
export async function xvaDisk(ctx: StageContext, xva: OpenedXva, xvaPath: string): Promise<{ path: string; name: string; owned: boolean; source?: Source }> {
  const { disk } = xva;
  const path = join(ctx.workdir, 'disk.img');
  const fh = ctx.engine === 'host' ? await open(path, 'w') : undefined;
  const closeFile = fh ? ctx.cleanup.defer(`close ${path}`, () => fh.close().catch(() => undefined)) : undefined;
  ctx.progress.total = disk.dataBlocks.reduce((n, b) => n + Math.min(b.length, disk.size - b.offset), 0);
  for (const b of disk.dataBlocks) {
    throwIfAborted(ctx.signal);
    const data = await disk.read(b.offset, Math.min(b.length, disk.size - b.offset));
    // XAPI always writes the first and last blocks, zeros or not: zeros stay holes here too.
    if (fh && !data.equals(ZERO.subarray(0, data.length))) await fh.write(data, 0, data.length, b.offset);
    ctx.progress.add(data.length);
  }
  ctx.note(`${disk.dataBlocks.length} blocks match their ${xva.layout.checksums.join(' and ')} checksums`);
  if (!fh) return { path: xvaPath, name: disk.name, owned: false, source: disk };
  await fh.truncate(disk.size);
  await closeFile!();
  return { path, name: disk.name, owned: true };
}

/** What --json and inspect say about an XVA: its VM, root disk and blocks. */
export interface XvaSummary {
  vmName: string;
  /** The root disk's VDI id, which names its directory in the tar. */
  vdi: string;
  virtualSize: number;
  /** Blocks holding data. */
  blocks: number;
  /** Block numbers left out: 1 MiB of zeros each. */
  leftOut: number;
  /** Zero-length keep-alive blocks. */
  keepAlive: number;
  checksums: ChecksumKind[];
}

export function xvaSummary({ ova, layout }: OpenedXva): XvaSummary {
  return {
    vmName: ova.vmName,
    vdi: ova.rootVdi.id,
    virtualSize: ova.rootVdi.virtualSize,
    blocks: layout.blocks.length - layout.keepAlive,
    leftOut: layout.leftOut,
    keepAlive: layout.keepAlive,
    checksums: layout.checksums,
  };
}
