import { lstat } from 'node:fs/promises';
import { join } from 'node:path';
import { CancelledError, InputError } from '../errors.js';
import { ExtFileSystem } from '../formats/ext/index.js';
import { chooseRootPartition, partitionSource, readPartitionTable, type Partition } from '../formats/partitions.js';
import type { Source } from '../formats/source.js';
import { partitionMethod, probeFacilities } from '../host/facilities.js';
import { blkidType, kpartxMap, sfdiskPartitions, type HostPartition } from '../host/partitions.js';
import { attachLoop, mount, mountPoint } from '../host/mounts.js';
import type { RawDisk } from './convert.js';
import type { StageContext } from './stage.js';

/** map: find the root partition and make it reachable (a block device, or a Source). */
export interface MappedRoot {
  index: number;
  /** The partition as messages name it, e.g. "disk.raw partition 1". */
  input: string;
  offset: number;
  size: number;
  /** Host engine: the block device of the partition. */
  device?: string;
  /** Host engine: file system type as blkid names it. */
  fsType?: string;
  /** Builtin engine: the partition's bytes. */
  source?: Source;
}

export type PartitionChoice = number | 'auto';

const RELEASE_FILES = ['etc/os-release', 'etc/redhat-release'];
/** MBR types of extended partitions (DOS, Windows LBA, Linux), which contain the logical ones. */
const EXTENDED_TYPES = new Set(['5', 'F', '85']);

function describe(parts: { index: number; type: string; size: number }[]): string {
  return parts.map((p) => `${p.index} (type ${p.type}, ${p.size} bytes)`).join(', ') || 'none';
}

async function builtinMap(ctx: StageContext, disk: RawDisk, choice: PartitionChoice): Promise<MappedRoot> {
  const src = disk.source!;
  const table = await readPartitionTable(src);
  const probe = async (p: Partition) => {
    // An unreadable candidate is not the root; its InputError becomes part of the "no root" message.
    const fs = await ExtFileSystem.open(partitionSource(src, p));
    for (const f of RELEASE_FILES) if (await fs.lookup(f)) return true;
    return false;
  };
  const root = await chooseRootPartition(table.partitions, probe, choice, src.name);
  ctx.note(`partition ${root.index} (${table.scheme}, type ${root.type}) at offset ${root.offset}`);
  const source = partitionSource(src, root);
  return { index: root.index, input: source.name, offset: root.offset, size: root.size, source };
}

/** Mount a candidate read-only and look for a release file; always unmounted and detached again. */
async function hostProbe(ctx: StageContext, device: string, input: string): Promise<boolean> {
  const fsType = await blkidType(device, ctx.signal);
  if (!fsType || !/^ext[234]$/.test(fsType)) return false;
  const dir = await mountPoint(ctx.workdir, ctx.cleanup, 'probe');
  const unmount = await mount(ctx.cleanup, { device, dir, type: fsType, options: readOnlyOptions(fsType), signal: ctx.signal, what: `mount ${device}` }).catch((err: Error) => {
    throw err instanceof CancelledError ? err : new InputError(input, `cannot mount its ${fsType}: ${err.message.replace(/^mount \S+: (mount: \S+: )?/, '')}`, { cause: err });
  });
  try {
    for (const f of RELEASE_FILES) if (await lstat(join(dir, f)).then(() => true, () => false)) return true;
    return false;
  } finally {
    await unmount();
  }
}

/** Read-only, and nothing from the image may act on the host; noload skips journal replay. */
export function readOnlyOptions(fsType: string): string[] {
  return ['ro', 'nodev', 'nosuid', 'noexec', ...(fsType === 'ext3' || fsType === 'ext4' ? ['noload'] : [])];
}

async function hostMap(ctx: StageContext, disk: RawDisk, name: string, choice: PartitionChoice): Promise<MappedRoot> {
  const { method, why } = partitionMethod(await probeFacilities());
  if (!method) throw new InputError(name, `the host engine cannot map partitions here: ${why}`);
  if (method === 'losetup') ctx.note(why);
  const path = disk.path!;
  let parts: HostPartition[] = await sfdiskPartitions(path, name, ctx.signal);
  const wholeDisk = parts.length === 0;
  if (wholeDisk) parts = [{ index: 1, offset: 0, size: disk.size, type: 'none', linux: true, swap: false }];
  for (const p of parts) {
    if (p.offset + p.size > disk.size) throw new InputError(name, `partition ${p.index} ends at byte ${p.offset + p.size}, beyond the ${disk.size}-byte disk`);
  }
  // sfdisk lists overlapping partitions without a word; an extended partition holds its logical ones.
  const primary = parts.filter((p) => !EXTENDED_TYPES.has(p.type));
  for (const [i, a] of primary.entries()) {
    const b = primary.slice(i + 1).find((q) => q.offset < a.offset + a.size && a.offset < q.offset + q.size);
    if (b) throw new InputError(name, `partitions ${a.index} (bytes ${a.offset}–${a.offset + a.size - 1}) and ${b.index} (bytes ${b.offset}–${b.offset + b.size - 1}) overlap`);
  }
  const mapped = method === 'kpartx' && !wholeDisk ? await kpartxMap(ctx.cleanup, path, ctx.signal) : undefined;
  const attach = async (p: HostPartition) => {
    if (mapped) {
      const device = mapped.get(p.index);
      if (!device) throw new InputError(name, `kpartx did not map partition ${p.index}`);
      return { device, detach: async () => {} };
    }
    return attachLoop(ctx.cleanup, path, { offset: p.offset, size: p.size }, ctx.signal);
  };
  let chosen: HostPartition | undefined;
  let device: string | undefined;
  if (choice !== 'auto') {
    chosen = parts.find((p) => p.index === choice);
    if (!chosen) throw new InputError(name, `no partition ${choice}; partitions: ${describe(parts)}`);
    if (chosen.swap) throw new InputError(name, `partition ${choice} is swap, not a file system`);
    device = (await attach(chosen)).device;
  } else {
    const reasons: string[] = [];
    for (const p of parts.filter((q) => q.linux && !q.swap)) {
      const a = await attach(p);
      const found = await hostProbe(ctx, a.device, `partition ${p.index}`).catch((err: unknown) => {
        if (!(err instanceof InputError)) throw err;
        reasons.push(err.message);
        return false;
      });
      if (found) {
        chosen = p;
        device = a.device;
        break;
      }
      await a.detach();
    }
    const why = reasons.length ? ` (${reasons.join('; ')})` : '';
    if (!chosen) throw new InputError(name, `no Linux partition holding /etc/os-release or /etc/redhat-release${why}; partitions: ${describe(parts)}`);
  }
  const fsType = await blkidType(device!, ctx.signal);
  if (!fsType || !/^ext[234]$/.test(fsType)) throw new InputError(name, `partition ${chosen.index} holds ${fsType ?? 'no recognisable'} file system, not ext2/3/4`);
  ctx.note(`partition ${chosen.index} (type ${chosen.type}, ${fsType}) at offset ${chosen.offset}${method === 'kpartx' ? ` as ${device}` : ''}`);
  return { index: chosen.index, input: `${name} partition ${chosen.index}`, offset: chosen.offset, size: chosen.size, device, fsType };
}

export async function mapRoot(ctx: StageContext, disk: RawDisk, name: string, choice: PartitionChoice): Promise<MappedRoot> {
  return ctx.engine === 'builtin' ? builtinMap(ctx, disk, choice) : hostMap(ctx, disk, name, choice);
}
