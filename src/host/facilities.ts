import { access, constants, readFile } from 'node:fs/promises';
import { EnvironmentError } from '../errors.js';
import { which } from './exec.js';

/**
 * What this machine offers the host engine. Probed, never assumed: containers commonly lack
 * loop devices or device-mapper, and some kernels (like ours in CI) have no iso9660 driver.
 */
export interface Facilities {
  root: boolean;
  kernelIso9660: boolean;
  fuse: boolean;
  loop: boolean;
  deviceMapper: boolean;
  tools: Record<string, string | undefined>;
}

export const HOST_TOOLS = ['mount', 'umount', 'losetup', 'kpartx', 'fuseiso', 'fusermount', 'bsdtar', 'zcat', 'dd', 'qemu-img', 'sfdisk', 'tar', 'blkid'] as const;

async function exists(path: string, mode = constants.F_OK): Promise<boolean> {
  try {
    await access(path, mode);
    return true;
  } catch {
    return false;
  }
}

async function kernelHas(fs: string): Promise<boolean> {
  const list = await readFile('/proc/filesystems', 'utf8').catch(() => '');
  if (list.split('\n').some((l) => l.trim().split(/\s+/).pop() === fs)) return true;
  // A module that is built but not loaded still counts: mount(8) loads it on demand.
  const release = (await readFile('/proc/sys/kernel/osrelease', 'utf8').catch(() => '')).trim();
  const dep = await readFile(`/lib/modules/${release}/modules.dep`, 'utf8').catch(() => '');
  return new RegExp(`/${fs}\\.ko(\\.[a-z]+)?:`).test(dep);
}

export async function probeFacilities(): Promise<Facilities> {
  const tools: Record<string, string | undefined> = {};
  await Promise.all(HOST_TOOLS.map(async (t) => (tools[t] = await which(t))));
  return {
    root: process.getuid?.() === 0,
    kernelIso9660: await kernelHas('iso9660'),
    fuse: await exists('/dev/fuse', constants.R_OK | constants.W_OK),
    loop: (await exists('/dev/loop-control', constants.R_OK | constants.W_OK)) || (await exists('/dev/loop0', constants.R_OK)),
    deviceMapper: await exists('/dev/mapper/control'),
    tools,
  };
}

export type IsoMethod = 'kernel' | 'fuseiso' | 'bsdtar';
export type PartitionMethod = 'kpartx' | 'losetup';

/** How the host engine will read the ISO here, or why it cannot. */
export function isoMethod(f: Facilities): { method?: IsoMethod; why: string } {
  if (f.root && f.loop && f.kernelIso9660 && f.tools.mount) return { method: 'kernel', why: 'mount -o loop (kernel iso9660)' };
  const noKernel = !f.kernelIso9660 ? 'no iso9660 in the kernel' : !f.root ? 'not root' : !f.loop ? 'no loop devices' : 'no mount';
  if (f.fuse && f.tools.fuseiso && f.tools.fusermount) return { method: 'fuseiso', why: `${noKernel}: using fuseiso (FUSE)` };
  if (f.tools.bsdtar) return { method: 'bsdtar', why: `${noKernel}, no usable FUSE/fuseiso: using bsdtar` };
  return { why: `${noKernel}, and neither fuseiso nor bsdtar is installed` };
}

/** How the host engine will reach the root partition here, or why it cannot. */
export function partitionMethod(f: Facilities): { method?: PartitionMethod; why: string } {
  if (!f.root) return { why: 'not root: loop devices and mount need root (use --engine builtin)' };
  if (!f.loop || !f.tools.losetup) return { why: 'no loop devices (use --engine builtin)' };
  if (f.deviceMapper && f.tools.kpartx) return { method: 'kpartx', why: 'kpartx -av (device-mapper)' };
  return { method: 'losetup', why: `no device-mapper${f.tools.kpartx ? '' : ' and no kpartx'}: kpartx unavailable, using losetup --offset` };
}

/** Fail before any work when the host engine cannot finish here, saying why. */
export async function assertHostEngineUsable(): Promise<void> {
  const f = await probeFacilities();
  const part = partitionMethod(f);
  if (!part.method) throw new EnvironmentError(`the host engine cannot run here: ${part.why}`);
  const iso = isoMethod(f);
  if (!iso.method) throw new EnvironmentError(`the host engine cannot run here: ${iso.why}`);
}
