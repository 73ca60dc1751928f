import { rm, stat, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { InputError } from '../errors.js';
import { detectVhd, openVhd, vhdInfo } from '../formats/vhd.js';
import { CHUNK_SIZE } from '../formats/xva.js';
import type { GrowingFile } from '../formats/growing.js';
import { FileSource, type Source } from '../formats/source.js';
import { tool, toolError } from '../host/exec.js';
import type { StageContext } from './stage.js';

/** convert: the disk stream as a raw disk. VHD (fixed or dynamic) is decoded; raw passes through. */
export interface RawDisk {
  /** Set when the raw disk exists as a file (host engine, or a raw payload). */
  path?: string;
  /** The builtin engine's random-access view of the raw disk. */
  source?: Source;
  size: number;
  /** Format of the payload as found. */
  payload: 'raw' | 'vhd';
}

/**
 * @param disk the reassembled stream: a file, a Source read in place, or a file still being
 *   decompressed (`growing`, read through views that wait for the bytes they need)
 * @param declaredSize the VDI size ova.xml declares, when the disk came from an XVA; a raw disk is
 *   extended to it (trailing all-zero chunks are left out), a VHD's virtual size must equal it.
 */
export async function convert(
  ctx: StageContext,
  disk: { path: string; name: string; owned: boolean; source?: Source; growing?: { file: GrowingFile; size: number } },
  declaredSize?: number,
): Promise<RawDisk> {
  const src = disk.growing?.file.view(disk.name, disk.growing.size) ?? disk.source ?? (await FileSource.open(disk.path, disk.name));
  const closeSrc = ctx.cleanup.defer(`close ${disk.name}`, () => src.close());
  const isVhd = await detectVhd(src);
  // A disk read in place (an XVA's, builtin engine) has its declared size already.
  if (!isVhd && disk.source) return { source: disk.source, size: disk.source.size, payload: 'raw' };
  if (!isVhd) {
    if (declaredSize !== undefined && src.size > declaredSize) throw new InputError(disk.name, `the chunks hold ${src.size} bytes, more than the ${declaredSize} bytes ova.xml declares`);
    // A chunk is short only where the disk ends: a last chunk that stops earlier lost its tail.
    const fullTo = declaredSize === undefined ? src.size : Math.min(declaredSize, Math.ceil(src.size / CHUNK_SIZE) * CHUNK_SIZE);
    if (src.size < fullTo) {
      const last = Math.floor((src.size - 1) / CHUNK_SIZE);
      throw new InputError(disk.name, `chunk ${last} ends at byte ${src.size}, but ova.xml declares a ${declaredSize}-byte disk, so it must run to byte ${fullTo}`);
    }
    const size = declaredSize ?? src.size;
    await closeSrc();
    // Trailing all-zero chunks were left out: give the disk its declared length.
    if (src.size < size) await truncate(disk.path, size);
    const source = disk.growing ? disk.growing.file.view(disk.name, size) : ctx.engine === 'builtin' ? await openOwned(ctx, disk) : undefined;
    return { path: disk.path, size, payload: 'raw', ...(source ? { source } : {}) };
  }
  const info = await vhdInfo(src);
  // Tools round a VHD's size up to a CHS geometry, so a larger virtual size is normal; a smaller one loses data.
  if (declaredSize !== undefined && info.currentSize < declaredSize) {
    throw new InputError(disk.name, `VHD virtual size ${info.currentSize} is smaller than the ${declaredSize} bytes ova.xml declares`);
  }
  ctx.note(`${info.diskType} VHD, ${info.currentSize} bytes`);
  if (ctx.engine === 'builtin') {
    // Decoded on the fly: no raw copy is ever written.
    const vhd = await openVhd(src);
    return { source: vhd, size: vhd.size, payload: 'vhd' };
  }
  await closeSrc();
  const raw = join(ctx.workdir, 'disk.raw');
  ctx.progress.total = info.currentSize;
  const qemu = tool('qemu-img', ['convert', '-p', '-f', 'vpc', '-O', 'raw', disk.path, raw], { signal: ctx.signal, buffer: { stdout: false } });
  qemu.stdout?.on('data', (b: Buffer) => {
    const m = /\((\d+(?:\.\d+)?)\/100%\)/.exec(b.toString('latin1').split('\r').filter(Boolean).pop() ?? '');
    if (m) ctx.progress.done = Math.round((Number(m[1]) / 100) * info.currentSize);
  });
  try {
    await qemu;
  } catch (err) {
    throw toolError(err, `qemu-img convert ${disk.name}`);
  }
  ctx.progress.done = info.currentSize;
  // The VHD is no longer needed: dropping it keeps peak scratch space near one disk.
  if (disk.owned) await rm(disk.path, { force: true });
  const size = (await stat(raw)).size;
  if (size !== info.currentSize) throw new InputError(disk.name, `qemu-img produced ${size} bytes, the VHD declares ${info.currentSize}`);
  return { path: raw, size, payload: 'vhd' };
}

async function openOwned(ctx: StageContext, disk: { path: string; name: string }): Promise<Source> {
  const s = await FileSource.open(disk.path, disk.name);
  ctx.cleanup.defer(`close ${disk.name}`, () => s.close());
  return s;
}
