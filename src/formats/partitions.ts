import { crc32 } from 'node:zlib';
import { InputError } from '../errors.js';
import { SliceSource, type Source } from './source.js';

/**
 * Partition tables: MBR (with the EBR chain of logical partitions) and UEFI GPT, 512-byte
 * logical sectors. Every on-disk offset and count is checked against the disk before use.
 */

export const SECTOR_SIZE = 512;

export type PartitionTypeName = 'linux' | 'swap' | 'extended' | 'lvm' | 'efi' | 'bios-boot' | 'other';

export interface Partition {
  /** 1-based like Linux: MBR primaries 1–4, logicals from 5; GPT entry number. */
  index: number;
  /** Byte offset on the disk. */
  offset: number;
  /** Size in bytes. */
  size: number;
  /** MBR type in hex as sfdisk prints it ('83', '5'), GPT type GUID, or 'none' for a whole disk. */
  type: string;
  typeName: PartitionTypeName;
  /** GPT partition name, when set. */
  name?: string;
  /** MBR boot indicator 0x80. */
  bootable?: boolean;
}

export interface PartitionTable {
  /** 'none': no partition table; the whole disk is reported as partition 1 of type 'none'. */
  scheme: 'mbr' | 'gpt' | 'none';
  partitions: Partition[];
  /** Problems that did not stop reading, e.g. a corrupt primary GPT replaced by the backup. */
  warnings: string[];
}

const MBR_TYPES: Record<number, PartitionTypeName> = {
  0x83: 'linux', 0x82: 'swap', 0x05: 'extended', 0x0f: 'extended', 0x85: 'extended', 0x8e: 'lvm', 0xef: 'efi',
};
const MBR_GPT_PROTECTIVE = 0xee;

const GPT_TYPES: Record<string, PartitionTypeName> = {
  '0FC63DAF-8483-4772-8E79-3D69D8477DE4': 'linux', // Linux filesystem data
  '4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709': 'linux', // root, x86-64 (Discoverable Partitions)
  '44479540-F297-41B2-9AF7-D131D5F0458A': 'linux', // root, x86
  'B921B045-1DF0-41C3-AF44-4C6F280D3FAE': 'linux', // root, AArch64
  '69DAD710-2CE4-4E3C-B16C-21A1D49ABED3': 'linux', // root, 32-bit ARM
  '0657FD6D-A4AB-43C4-84E5-0933C84B4F4F': 'swap',
  'E6D6D379-F507-44C2-A23C-238F2A3DF928': 'lvm',
  'C12A7328-F81F-11D2-BA4B-00A0C93EC93B': 'efi',
  '21686148-6449-6E6F-744E-656564454649': 'bios-boot',
};

const GPT_SIGNATURE = Buffer.from('EFI PART', 'latin1');
const GPT_HEADER_MIN = 92;
// The UEFI minimum array is 16 KiB; 8 MiB leaves room for odd tools and bounds the allocation.
const GPT_MAX_ARRAY_BYTES = 8 * 1024 * 1024;
// Linux allows at most 256 minors per disk; a longer EBR chain is corruption.
const MAX_LOGICAL = 252;

function mbrTypeName(type: number): PartitionTypeName {
  return MBR_TYPES[type] ?? 'other';
}

function sectorsRange(p: { offset: number; size: number }): string {
  const start = p.offset / SECTOR_SIZE;
  return `sectors ${start}–${start + p.size / SECTOR_SIZE - 1}`;
}

/** Throws if two partitions of the list share a sector. */
function checkOverlaps(name: string, parts: Partition[]): void {
  const sorted = [...parts].sort((a, b) => a.offset - b.offset);
  let reach: Partition | undefined;
  for (const p of sorted) {
    if (reach && p.offset < reach.offset + reach.size) {
      throw new InputError(name, `partitions ${reach.index} (${sectorsRange(reach)}) and ${p.index} (${sectorsRange(p)}) overlap`);
    }
    if (!reach || p.offset + p.size > reach.offset + reach.size) reach = p;
  }
}

interface MbrEntry {
  bootIndicator: number;
  type: number;
  lba: number;
  sectors: number;
}

function mbrEntries(sector: Buffer): MbrEntry[] {
  const entries: MbrEntry[] = [];
  for (let i = 0; i < 4; i++) {
    const e = 446 + i * 16;
    entries.push({
      bootIndicator: sector[e]!,
      type: sector[e + 4]!,
      lba: sector.readUInt32LE(e + 8),
      sectors: sector.readUInt32LE(e + 12),
    });
  }
  return entries;
}

function hasMbrSignature(sector: Buffer): boolean {
  return sector[510] === 0x55 && sector[511] === 0xaa;
}

function isEmpty(e: MbrEntry): boolean {
  return e.type === 0 || e.sectors === 0;
}

/** Reads the table of a disk with 512-byte sectors. */
export async function readPartitionTable(source: Source): Promise<PartitionTable> {
  const whole: PartitionTable = {
    scheme: 'none',
    partitions: [{ index: 1, offset: 0, size: source.size, type: 'none', typeName: 'other' }],
    warnings: [],
  };
  if (source.size < SECTOR_SIZE) return whole;
  const mbr = await source.read(0, SECTOR_SIZE);
  if (!hasMbrSignature(mbr)) return whole;
  const entries = mbrEntries(mbr);
  // As Linux does: a boot indicator other than 0x00/0x80 means a boot sector (FAT, NTFS), not an MBR.
  if (entries.some((e) => e.bootIndicator !== 0 && e.bootIndicator !== 0x80)) return whole;
  if (entries.some((e) => !isEmpty(e) && e.type === MBR_GPT_PROTECTIVE)) return readGpt(source);
  return readMbr(source, entries);
}

async function readMbr(source: Source, entries: MbrEntry[]): Promise<PartitionTable> {
  const name = source.name;
  const diskSectors = Math.floor(source.size / SECTOR_SIZE);
  const warnings: string[] = [];
  const primaries: Partition[] = [];
  const logicals: Partition[] = [];

  const make = (index: number, e: MbrEntry, start: number): Partition => {
    if (start + e.sectors > diskSectors) {
      throw new InputError(name, `partition ${index} (sectors ${start}–${start + e.sectors - 1}) extends past the end of the disk (${diskSectors} sectors)`);
    }
    return {
      index,
      offset: start * SECTOR_SIZE,
      size: e.sectors * SECTOR_SIZE,
      type: e.type.toString(16),
      typeName: mbrTypeName(e.type),
      bootable: e.bootIndicator === 0x80,
    };
  };

  entries.forEach((e, i) => {
    if (!isEmpty(e)) primaries.push(make(i + 1, e, e.lba));
  });
  checkOverlaps(name, primaries);

  let nextLogical = 5;
  for (const ext of primaries.filter((p) => p.typeName === 'extended')) {
    const extStart = ext.offset / SECTOR_SIZE;
    const extEnd = extStart + ext.size / SECTOR_SIZE;
    const seen = new Set<number>();
    const inExtended: Partition[] = [];
    let ebrAt = extStart;
    for (;;) {
      if (seen.has(ebrAt)) throw new InputError(name, `the EBR chain of extended partition ${ext.index} loops back to sector ${ebrAt}`);
      if (ebrAt < extStart || ebrAt >= extEnd) {
        throw new InputError(name, `an EBR of extended partition ${ext.index} lies at sector ${ebrAt}, outside the partition (sectors ${extStart}–${extEnd - 1})`);
      }
      if (seen.size >= MAX_LOGICAL) throw new InputError(name, `the EBR chain of extended partition ${ext.index} is longer than ${MAX_LOGICAL} links`);
      seen.add(ebrAt);
      const ebr = await source.read(ebrAt * SECTOR_SIZE, SECTOR_SIZE);
      if (!hasMbrSignature(ebr)) {
        // An empty extended partition has a blank first EBR; anything else is damage worth a word.
        if (ebr.some((b) => b !== 0)) warnings.push(`EBR at sector ${ebrAt} has no 0x55AA signature; ignoring the rest of the chain`);
        break;
      }
      const [logical, link] = mbrEntries(ebr) as [MbrEntry, MbrEntry];
      if (!isEmpty(logical)) {
        const p = make(nextLogical++, logical, ebrAt + logical.lba);
        if (p.offset / SECTOR_SIZE < extStart || (p.offset + p.size) / SECTOR_SIZE > extEnd) {
          throw new InputError(name, `logical partition ${p.index} (${sectorsRange(p)}) lies outside extended partition ${ext.index} (${sectorsRange(ext)})`);
        }
        inExtended.push(p);
      }
      if (isEmpty(link) || mbrTypeName(link.type) !== 'extended') break;
      // Links are relative to the start of the extended partition, logicals to their own EBR.
      ebrAt = extStart + link.lba;
    }
    checkOverlaps(name, inExtended);
    logicals.push(...inExtended);
  }
  return { scheme: 'mbr', partitions: [...primaries, ...logicals], warnings };
}

/** GUIDs store their first three fields little-endian. */
function formatGuid(b: Buffer): string {
  const h = (start: number, end: number, reverse: boolean): string => {
    const bytes = [...b.subarray(start, end)];
    return Buffer.from(reverse ? bytes.reverse() : bytes).toString('hex');
  };
  return `${h(0, 4, true)}-${h(4, 6, true)}-${h(6, 8, true)}-${h(8, 10, false)}-${h(10, 16, false)}`.toUpperCase();
}

function u64(buf: Buffer, at: number): number {
  const v = buf.readBigUInt64LE(at);
  // Any LBA this large lies beyond every disk we can read; Infinity fails the range checks.
  return v > BigInt(Number.MAX_SAFE_INTEGER) ? Infinity : Number(v);
}

interface GptHeader {
  lba: number;
  firstUsable: number;
  lastUsable: number;
  entries: Buffer;
  entrySize: number;
}

/** Reads and checks the header at `lba` and its entry array; returns it, or why it is unusable. */
async function readGptHeader(source: Source, lba: number): Promise<GptHeader | string> {
  const diskSectors = Math.floor(source.size / SECTOR_SIZE);
  if (lba >= diskSectors) return 'the disk is too small to hold it';
  const sector = await source.read(lba * SECTOR_SIZE, SECTOR_SIZE);
  if (!sector.subarray(0, 8).equals(GPT_SIGNATURE)) return 'no "EFI PART" signature';
  const headerSize = sector.readUInt32LE(12);
  if (headerSize < GPT_HEADER_MIN || headerSize > SECTOR_SIZE) return `invalid Header Size ${headerSize}`;
  const header = Buffer.from(sector.subarray(0, headerSize));
  const storedCrc = header.readUInt32LE(16);
  header.writeUInt32LE(0, 16);
  const headerCrc = crc32(header);
  if (storedCrc !== headerCrc) return `header CRC32 mismatch (stored 0x${storedCrc.toString(16)}, computed 0x${headerCrc.toString(16)})`;
  const myLba = u64(header, 24);
  if (myLba !== lba) return `MyLBA ${myLba} is not its own location`;
  const firstUsable = u64(header, 40);
  const lastUsable = u64(header, 48);
  if (firstUsable > lastUsable || lastUsable >= diskSectors) {
    return `usable area (LBA ${firstUsable}–${lastUsable}) does not fit the ${diskSectors}-sector disk`;
  }
  const entryLba = u64(header, 72);
  const count = header.readUInt32LE(80);
  const entrySize = header.readUInt32LE(84);
  if (entrySize < 128 || entrySize % 128 !== 0 || (entrySize & (entrySize - 1)) !== 0) return `invalid Size Of Partition Entry ${entrySize}`;
  const arrayBytes = count * entrySize;
  if (arrayBytes > GPT_MAX_ARRAY_BYTES) return `absurd partition entry array (${count} entries of ${entrySize} bytes)`;
  if (entryLba * SECTOR_SIZE + arrayBytes > diskSectors * SECTOR_SIZE) {
    return `partition entry array (LBA ${entryLba}, ${arrayBytes} bytes) lies past the end of the disk`;
  }
  const entries = await source.read(entryLba * SECTOR_SIZE, arrayBytes);
  const storedArrayCrc = header.readUInt32LE(88);
  const arrayCrc = crc32(entries);
  if (storedArrayCrc !== arrayCrc) {
    return `partition entry array CRC32 mismatch (stored 0x${storedArrayCrc.toString(16)}, computed 0x${arrayCrc.toString(16)})`;
  }
  return { lba, firstUsable, lastUsable, entries, entrySize };
}

async function readGpt(source: Source): Promise<PartitionTable> {
  const name = source.name;
  const diskSectors = Math.floor(source.size / SECTOR_SIZE);
  const warnings: string[] = [];
  let header = await readGptHeader(source, 1);
  if (typeof header === 'string') {
    if (source.size >= 4096 * 2 && (await source.read(4096, 8)).equals(GPT_SIGNATURE)) {
      throw new InputError(name, 'GPT with 4096-byte logical sectors is not supported (only 512-byte sectors)');
    }
    const backupLba = diskSectors - 1;
    const backup = await readGptHeader(source, backupLba);
    if (typeof backup === 'string') {
      throw new InputError(name, `GPT is corrupt: primary header at LBA 1: ${header}; backup header at LBA ${backupLba}: ${backup}`);
    }
    warnings.push(`primary GPT header at LBA 1 is unusable (${header}); using the backup header at LBA ${backupLba}`);
    header = backup;
  }

  const partitions: Partition[] = [];
  for (let i = 0; i * header.entrySize < header.entries.length; i++) {
    const e = header.entries.subarray(i * header.entrySize, (i + 1) * header.entrySize);
    if (e.subarray(0, 16).every((b) => b === 0)) continue;
    const index = i + 1;
    const first = u64(e, 32);
    const last = u64(e, 40);
    if (first > last) throw new InputError(name, `GPT partition ${index} ends (LBA ${last}) before it starts (LBA ${first})`);
    if (last >= diskSectors) {
      throw new InputError(name, `partition ${index} (sectors ${first}–${last}) extends past the end of the disk (${diskSectors} sectors)`);
    }
    if (first < header.firstUsable || last > header.lastUsable) {
      warnings.push(`GPT partition ${index} (sectors ${first}–${last}) lies outside the usable area (LBA ${header.firstUsable}–${header.lastUsable})`);
    }
    const type = formatGuid(e.subarray(0, 16));
    // PartitionName: 36 UTF-16LE code units, NUL-terminated when shorter.
    let nameEnd = 56;
    while (nameEnd < 128 && e.readUInt16LE(nameEnd) !== 0) nameEnd += 2;
    const partName = e.subarray(56, nameEnd).toString('utf16le');
    partitions.push({
      index,
      offset: first * SECTOR_SIZE,
      size: (last - first + 1) * SECTOR_SIZE,
      type,
      typeName: GPT_TYPES[type] ?? 'other',
      ...(partName ? { name: partName } : {}),
    });
  }
  checkOverlaps(name, partitions);
  return { scheme: 'gpt', partitions, warnings };
}

/** The partition as a Source of its own, named e.g. "disk.raw partition 1". */
export function partitionSource(source: Source, p: Partition): Source {
  const name = p.type === 'none' ? source.name : `${source.name} partition ${p.index}`;
  return new SliceSource(source, p.offset, p.size, name);
}

function formatSize(bytes: number): string {
  const units = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${v} bytes` : `${v.toFixed(1)} ${units[u]}`;
}

function describe(p: Partition): string {
  if (p.type === 'none') return `whole disk (no partition table, ${formatSize(p.size)})`;
  const label = p.name ? ` "${p.name}"` : '';
  return `${p.index}: ${p.typeName} (type ${p.type})${label}, ${formatSize(p.size)} at sector ${p.offset / SECTOR_SIZE}`;
}

function listing(partitions: Partition[]): string {
  return partitions.length ? `partitions: ${partitions.map(describe).join('; ')}` : 'the partition table is empty';
}

/**
 * Picks the partition holding the root file system. `override` names one by index; 'auto' tries
 * the Linux-type partitions (or a whole disk without a table) in order and takes the first whose
 * `probe` says yes (the caller checks for /etc/os-release or /etc/redhat-release).
 */
export async function chooseRootPartition(
  partitions: Partition[],
  probe: (p: Partition) => Promise<boolean>,
  override: number | 'auto' = 'auto',
  diskName = 'disk',
): Promise<Partition> {
  if (override !== 'auto') {
    const p = partitions.find((q) => q.index === override);
    if (!p) throw new InputError(diskName, `there is no partition ${override}; ${listing(partitions)}`);
    if (p.typeName === 'extended' || p.typeName === 'swap') {
      throw new InputError(diskName, `partition ${override} is ${p.typeName === 'swap' ? 'swap' : 'an extended partition'}, not a file system; ${listing(partitions)}`);
    }
    return p;
  }
  const reasons: string[] = [];
  for (const p of partitions) {
    if (p.typeName !== 'linux' && p.type !== 'none') continue;
    try {
      if (await probe(p)) return p;
    } catch (err) {
      if (!(err instanceof InputError)) throw err;
      reasons.push(`partition ${p.index}: ${err.message}`);
    }
  }
  const why = reasons.length ? ` (${reasons.join('; ')})` : '';
  throw new InputError(
    diskName,
    `no root file system found: no Linux partition holds /etc/os-release or /etc/redhat-release${why}; ${listing(partitions)}; choose one with --partition N`,
  );
}
