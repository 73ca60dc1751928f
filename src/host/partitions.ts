import { InputError, throwIfAborted } from '../errors.js';
import type { Cleanup } from '../pipeline/cleanup.js';
import { run } from './exec.js';

export interface HostPartition {
  index: number;
  offset: number;
  size: number;
  /** MBR type as hex ('83') or GPT type GUID. */
  type: string;
  linux: boolean;
  swap: boolean;
}

const LINUX_TYPES = new Set(['83', '0FC63DAF-8483-4772-8E79-3D69D8477DE4', '4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709', '44479540-F297-41B2-9AF7-D131D5F0458A']);
const SWAP_TYPES = new Set(['82', '0657FD6D-A4AB-43C4-84E5-0933C84B4F4F']);

/** The partition table as sfdisk reads it; a disk without one is one whole-disk "partition". */
export async function sfdiskPartitions(disk: string, name: string, signal?: AbortSignal): Promise<HostPartition[]> {
  let json: string;
  try {
    json = await run('sfdisk', ['--json', disk], `sfdisk ${name}`, { signal });
  } catch (err) {
    if (/does not contain a recognized partition table/i.test((err as Error).message)) return [];
    throw err;
  }
  const table = (JSON.parse(json) as { partitiontable: { sectorsize?: number; partitions?: { node: string; start: number; size: number; type: string }[] } }).partitiontable;
  const sector = table.sectorsize ?? 512;
  return (table.partitions ?? []).map((p) => {
    const index = Number(/(\d+)$/.exec(p.node)?.[1]);
    const type = p.type.toUpperCase().replace(/^0+(?=.)/, '');
    return { index, offset: p.start * sector, size: p.size * sector, type, linux: LINUX_TYPES.has(type), swap: SWAP_TYPES.has(type) };
  });
}

/** Map partitions with kpartx (device-mapper); returns /dev/mapper devices by partition index. */
export async function kpartxMap(cleanup: Cleanup, disk: string, signal?: AbortSignal): Promise<Map<number, string>> {
  cleanup.defer(`kpartx -d ${disk}`, async () => {
    await run('kpartx', ['-d', disk], `kpartx -d ${disk}`);
  });
  const out = await run('kpartx', ['-a', '-v', '-r', disk], `kpartx ${disk}`);
  throwIfAborted(signal);
  const devices = new Map<number, string>();
  for (const line of out.split('\n')) {
    const m = /^add map (\S*?p(\d+)) /.exec(line);
    if (m) devices.set(Number(m[2]), `/dev/mapper/${m[1]}`);
  }
  if (devices.size === 0) throw new InputError(disk, 'kpartx found no partitions');
  return devices;
}

export async function blkidType(device: string, signal?: AbortSignal): Promise<string | undefined> {
  try {
    return (await run('blkid', ['-p', '-o', 'value', '-s', 'TYPE', device], `blkid ${device}`, { signal })).trim() || undefined;
  } catch {
    return undefined;
  }
}
