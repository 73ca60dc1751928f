import { InputError } from '../errors.js';
import { checkReadRange, type Source } from './source.js';

/**
 * Microsoft VHD (Virtual Hard Disk Image Format Specification 1.0): fixed and dynamic disks,
 * read-only, presented as a Source over the virtual disk. Every on-disk offset, count and size
 * is checked against the file before use.
 */

const SECTOR = 512;
const FOOTER_COOKIE = Buffer.from('conectix', 'latin1');
const HEADER_COOKIE = Buffer.from('cxsparse', 'latin1');
const DYNAMIC_HEADER_SIZE = 1024;
const UNALLOCATED = 0xffffffff;
const DISK_TYPE_FIXED = 2;
const DISK_TYPE_DYNAMIC = 3;
const DISK_TYPE_DIFFERENCING = 4;
// The spec's default is 2 MiB; anything outside these bounds is corruption, not a real image.
const MIN_BLOCK_SIZE = SECTOR;
const MAX_BLOCK_SIZE = 256 * 1024 * 1024;
// 16 Mi entries of 2 MiB blocks describe 32 TiB, far beyond the format's 2 TiB limit.
const MAX_BAT_BYTES = 64 * 1024 * 1024;
const BAT_READ_CHUNK = 1024 * 1024;
// Bound on cached sector bitmaps, in bytes (512 bytes each for the usual 2 MiB blocks).
const BITMAP_CACHE_BYTES = 4 * 1024 * 1024;

export interface VhdInfo {
  diskType: 'fixed' | 'dynamic';
  /** Footer `Current Size`: the size of the virtual disk in bytes. */
  currentSize: number;
  /** Dynamic header `Block Size` (dynamic disks only). */
  blockSize?: number;
  /** Block Allocation Table entries in use (dynamic disks only). */
  allocatedBlocks?: number;
  /** Problems that did not stop reading, e.g. a corrupt trailing footer replaced by its copy. */
  warnings: string[];
}

export interface ByteRange {
  offset: number;
  length: number;
}

/** A Source over the virtual disk of a VHD; closing it leaves the underlying file open. */
export interface VhdSource extends Source {
  readonly info: VhdInfo;
  /**
   * Virtual byte ranges that may hold data (allocated blocks, merged when adjacent), in
   * ascending order; everything else reads as zeros. A fixed disk is one range.
   */
  allocatedRanges(): AsyncIterable<ByteRange>;
}

interface Footer {
  diskType: number;
  dataOffset: bigint;
  currentSize: number;
}

interface FooterHit {
  buf: Buffer;
  at: number;
}

interface Layout {
  footer: Footer;
  /** Where the data area ends: the trailing footer, or the end of the file without one. */
  dataEnd: number;
  warnings: string[];
  dynamic?: {
    blockSize: number;
    bitmapSize: number;
    bat: Uint32Array;
    allocatedBlocks: number;
  };
}

function hasCookie(buf: Buffer, cookie: Buffer): boolean {
  return buf.length >= cookie.length && buf.subarray(0, cookie.length).equals(cookie);
}

/** One's complement of the byte sum, with the 4-byte checksum field taken as zero. */
function vhdChecksum(buf: Buffer, checksumAt: number): number {
  let sum = 0;
  for (let i = 0; i < buf.length; i++) {
    if (i < checksumAt || i >= checksumAt + 4) sum += buf[i]!;
  }
  return ~sum >>> 0;
}

function hex32(n: number): string {
  return `0x${n.toString(16).padStart(8, '0')}`;
}

/** Trailing footer candidates: 512 bytes, or 511 bytes as written before Virtual PC 2004. */
async function findTrailingFooter(source: Source): Promise<FooterHit | null> {
  if (source.size < SECTOR) return null;
  const tail = await source.read(source.size - SECTOR, SECTOR);
  if (hasCookie(tail, FOOTER_COOKIE)) return { buf: tail, at: source.size - SECTOR };
  if (hasCookie(tail.subarray(1), FOOTER_COOKIE)) return { buf: tail.subarray(1), at: source.size - (SECTOR - 1) };
  return null;
}

async function findHeadFooter(source: Source): Promise<FooterHit | null> {
  if (source.size < SECTOR) return null;
  const head = await source.read(0, SECTOR);
  return hasCookie(head, FOOTER_COOKIE) ? { buf: head, at: 0 } : null;
}

/** True when the source looks like a VHD: a footer cookie at its end, or the dynamic copy at 0. */
export async function detectVhd(source: Source): Promise<boolean> {
  return (await findTrailingFooter(source)) !== null || (await findHeadFooter(source)) !== null;
}

/** Checks a footer; returns it, or the reason it is unusable. */
function parseFooter(hit: FooterHit, where: string): Footer | string {
  const { buf } = hit;
  const stored = buf.readUInt32BE(64);
  const computed = vhdChecksum(buf, 64);
  if (stored !== computed) {
    return `VHD footer checksum mismatch (${where}: stored ${hex32(stored)}, computed ${hex32(computed)})`;
  }
  const version = buf.readUInt32BE(12);
  if (version >>> 16 !== 1) return `unsupported VHD File Format Version ${hex32(version)} (${where})`;
  const currentSize = buf.readBigUInt64BE(48);
  if (currentSize > BigInt(Number.MAX_SAFE_INTEGER)) return `absurd VHD Current Size ${currentSize} (${where})`;
  return { diskType: buf.readUInt32BE(60), dataOffset: buf.readBigUInt64BE(16), currentSize: Number(currentSize) };
}

async function readLayout(source: Source): Promise<Layout> {
  const name = source.name;
  const warnings: string[] = [];
  const trailing = await findTrailingFooter(source);
  const trailingFooter = trailing && parseFooter(trailing, `footer at offset ${trailing.at}`);
  let footer: Footer;
  if (trailingFooter !== null && typeof trailingFooter !== 'string') {
    footer = trailingFooter;
  } else {
    // A dynamic disk keeps a copy of its footer at offset 0 for exactly this case.
    const head = await findHeadFooter(source);
    const headFooter = head && parseFooter(head, 'footer copy at offset 0');
    const usable = headFooter !== null && typeof headFooter !== 'string' && headFooter.diskType !== DISK_TYPE_FIXED;
    if (!usable) {
      if (typeof trailingFooter === 'string') throw new InputError(name, trailingFooter);
      if (typeof headFooter === 'string') throw new InputError(name, headFooter);
      throw new InputError(name, 'not a VHD: no footer cookie "conectix" in the last 512 bytes');
    }
    footer = headFooter;
    warnings.push(
      typeof trailingFooter === 'string'
        ? `${trailingFooter}; using the footer copy at offset 0`
        : 'no VHD footer at the end of the file (truncated?); using the footer copy at offset 0',
    );
  }
  // Even a corrupt trailing footer marks where the data area ends.
  const dataEnd = trailing ? trailing.at : source.size;

  switch (footer.diskType) {
    case DISK_TYPE_FIXED:
      if (footer.currentSize > dataEnd) {
        throw new InputError(name, `fixed VHD Current Size ${footer.currentSize} exceeds the ${dataEnd} bytes of data before the footer (truncated?)`);
      }
      return { footer, dataEnd, warnings };
    case DISK_TYPE_DYNAMIC:
      return { footer, dataEnd, warnings, dynamic: await readDynamic(source, footer, dataEnd) };
    case DISK_TYPE_DIFFERENCING:
      throw new InputError(name, 'differencing VHD (Disk Type 4) is not supported: its data depends on a parent image; merge it first (e.g. qemu-img convert -O vpc)');
    default:
      throw new InputError(name, `unknown VHD Disk Type ${footer.diskType}`);
  }
}

async function readDynamic(source: Source, footer: Footer, dataEnd: number): Promise<NonNullable<Layout['dynamic']>> {
  const name = source.name;
  const headerAt = footer.dataOffset;
  if (headerAt + BigInt(DYNAMIC_HEADER_SIZE) > BigInt(dataEnd)) {
    throw new InputError(name, `VHD Data Offset ${headerAt} points past the end of the ${source.size}-byte file`);
  }
  const header = await source.read(Number(headerAt), DYNAMIC_HEADER_SIZE);
  if (!hasCookie(header, HEADER_COOKIE)) {
    throw new InputError(name, `no dynamic disk header (cookie "cxsparse") at VHD Data Offset ${headerAt}`);
  }
  const stored = header.readUInt32BE(36);
  const computed = vhdChecksum(header, 36);
  if (stored !== computed) {
    throw new InputError(name, `VHD dynamic disk header checksum mismatch (stored ${hex32(stored)}, computed ${hex32(computed)})`);
  }
  const version = header.readUInt32BE(24);
  if (version >>> 16 !== 1) throw new InputError(name, `unsupported VHD dynamic disk Header Version ${hex32(version)}`);

  const blockSize = header.readUInt32BE(32);
  if (blockSize < MIN_BLOCK_SIZE || blockSize > MAX_BLOCK_SIZE || (blockSize & (blockSize - 1)) !== 0) {
    throw new InputError(name, `invalid VHD Block Size ${blockSize} (must be a power of two from ${MIN_BLOCK_SIZE} to ${MAX_BLOCK_SIZE})`);
  }
  const maxTableEntries = header.readUInt32BE(28);
  const needed = Math.ceil(footer.currentSize / blockSize);
  if (maxTableEntries < needed) {
    throw new InputError(name, `VHD Max Table Entries ${maxTableEntries} is too small for Current Size ${footer.currentSize} in ${blockSize}-byte blocks (${needed} needed)`);
  }
  if (needed * 4 > MAX_BAT_BYTES) {
    throw new InputError(name, `absurd VHD Block Allocation Table of ${needed} entries`);
  }
  const tableOffset = header.readBigUInt64BE(16);
  if (tableOffset + BigInt(needed * 4) > BigInt(dataEnd)) {
    throw new InputError(name, `VHD Block Allocation Table (Table Offset ${tableOffset}, ${needed} entries) lies past the end of the ${source.size}-byte file`);
  }

  const bat = new Uint32Array(needed);
  for (let i = 0; i < needed; i += BAT_READ_CHUNK / 4) {
    const count = Math.min(BAT_READ_CHUNK / 4, needed - i);
    const chunk = await source.read(Number(tableOffset) + i * 4, count * 4);
    for (let j = 0; j < count; j++) bat[i + j] = chunk.readUInt32BE(j * 4);
  }

  const bitmapSize = Math.ceil(blockSize / SECTOR / 8 / SECTOR) * SECTOR;
  let allocatedBlocks = 0;
  for (let i = 0; i < needed; i++) {
    const entry = bat[i]!;
    if (entry === UNALLOCATED) continue;
    allocatedBlocks++;
    const dataLength = Math.min(blockSize, footer.currentSize - i * blockSize);
    if (entry * SECTOR + bitmapSize + dataLength > dataEnd) {
      throw new InputError(name, `VHD Block Allocation Table entry ${i} points to sector ${entry}, past the end of the ${source.size}-byte file`);
    }
  }
  return { blockSize, bitmapSize, bat, allocatedBlocks };
}

function toInfo(layout: Layout): VhdInfo {
  const { footer, dynamic, warnings } = layout;
  if (!dynamic) return { diskType: 'fixed', currentSize: footer.currentSize, warnings };
  return {
    diskType: 'dynamic',
    currentSize: footer.currentSize,
    blockSize: dynamic.blockSize,
    allocatedBlocks: dynamic.allocatedBlocks,
    warnings,
  };
}

/** Reads and checks the VHD's metadata without opening the virtual disk. */
export async function vhdInfo(source: Source): Promise<VhdInfo> {
  return toInfo(await readLayout(source));
}

/** A run of virtual bytes that is either stored at `fileOffset` or reads as zeros (null). */
interface Segment {
  offset: number;
  length: number;
  fileOffset: number | null;
}

class FixedVhdSource implements VhdSource {
  readonly size: number;
  constructor(
    private readonly file: Source,
    readonly info: VhdInfo,
    readonly name: string,
  ) {
    this.size = info.currentSize;
  }

  async read(position: number, length: number): Promise<Buffer> {
    checkReadRange(this, position, length);
    return this.file.read(position, length);
  }

  readSync(position: number, length: number): Buffer | undefined {
    checkReadRange(this, position, length);
    return this.file.readSync?.(position, length);
  }

  async *allocatedRanges(): AsyncIterable<ByteRange> {
    if (this.size > 0) yield { offset: 0, length: this.size };
  }

  async close(): Promise<void> {}
}

interface Bitmap {
  /** All sectors present: the common case, skips the per-sector scan. */
  full: boolean;
  bits: Buffer;
}

class DynamicVhdSource implements VhdSource {
  readonly size: number;
  private readonly blockSize: number;
  private readonly bitmapSize: number;
  private readonly bat: Uint32Array;
  // Insertion order doubles as LRU order; promises so concurrent reads share one load.
  private readonly bitmaps = new Map<number, Promise<Bitmap>>();
  private readonly maxBitmaps: number;

  constructor(
    private readonly file: Source,
    dynamic: NonNullable<Layout['dynamic']>,
    readonly info: VhdInfo,
    readonly name: string,
  ) {
    this.size = info.currentSize;
    this.blockSize = dynamic.blockSize;
    this.bitmapSize = dynamic.bitmapSize;
    this.bat = dynamic.bat;
    this.maxBitmaps = Math.max(1, Math.floor(BITMAP_CACHE_BYTES / this.bitmapSize));
  }

  private bitmap(block: number): Promise<Bitmap> {
    const cached = this.bitmaps.get(block);
    if (cached) {
      this.bitmaps.delete(block);
      this.bitmaps.set(block, cached);
      return cached;
    }
    const loading = this.file.read(this.bat[block]! * SECTOR, this.bitmapSize).then((bits) => {
      const used = Math.ceil(Math.min(this.blockSize, this.size - block * this.blockSize) / SECTOR);
      return { full: allSet(bits, used), bits };
    });
    loading.catch(() => this.bitmaps.delete(block));
    this.bitmaps.set(block, loading);
    if (this.bitmaps.size > this.maxBitmaps) this.bitmaps.delete(this.bitmaps.keys().next().value!);
    return loading;
  }

  /** Splits [position, position + length) into stored and zero segments, merging neighbours. */
  private async segments(position: number, length: number): Promise<Segment[]> {
    const out: Segment[] = [];
    const push = (offset: number, len: number, fileOffset: number | null): void => {
      const last = out[out.length - 1];
      if (
        last &&
        ((last.fileOffset === null && fileOffset === null) ||
          (last.fileOffset !== null && fileOffset !== null && last.fileOffset + last.length === fileOffset))
      ) {
        last.length += len;
      } else {
        out.push({ offset, length: len, fileOffset });
      }
    };
    const end = position + length;
    let pos = position;
    while (pos < end) {
      const block = Math.floor(pos / this.blockSize);
      const blockStart = block * this.blockSize;
      const stop = Math.min(end, blockStart + this.blockSize);
      const entry = this.bat[block]!;
      if (entry === UNALLOCATED) {
        push(pos, stop - pos, null);
      } else {
        const dataAt = entry * SECTOR + this.bitmapSize;
        const bitmap = await this.bitmap(block);
        if (bitmap.full) {
          push(pos, stop - pos, dataAt + (pos - blockStart));
        } else {
          forEachRun(bitmap.bits, (pos - blockStart) / SECTOR, (stop - blockStart) / SECTOR, (from, to, present) => {
            const a = Math.max(pos, blockStart + from * SECTOR);
            const b = Math.min(stop, blockStart + to * SECTOR);
            push(a, b - a, present ? dataAt + (a - blockStart) : null);
          });
        }
      }
      pos = stop;
    }
    return out;
  }

  async read(position: number, length: number): Promise<Buffer> {
    checkReadRange(this, position, length);
    const segments = await this.segments(position, length);
    const only = segments.length === 1 ? segments[0]! : undefined;
    if (only && only.fileOffset !== null) return this.file.read(only.fileOffset, length);
    const out = Buffer.alloc(length);
    for (const s of segments) {
      if (s.fileOffset === null) continue;
      (await this.file.read(s.fileOffset, s.length)).copy(out, s.offset - position);
    }
    return out;
  }

  async *allocatedRanges(): AsyncIterable<ByteRange> {
    let start = -1;
    for (let i = 0; i <= this.bat.length; i++) {
      const allocated = i < this.bat.length && this.bat[i] !== UNALLOCATED;
      if (allocated && start < 0) start = i;
      if (!allocated && start >= 0) {
        const offset = start * this.blockSize;
        yield { offset, length: Math.min(this.size, i * this.blockSize) - offset };
        start = -1;
      }
    }
  }

  async close(): Promise<void> {
    this.bitmaps.clear();
  }
}

/** True when the first `count` bits (most significant bit first) are all set. */
function allSet(bits: Buffer, count: number): boolean {
  const whole = Math.floor(count / 8);
  for (let i = 0; i < whole; i++) if (bits[i] !== 0xff) return false;
  const rest = count % 8;
  const mask = (0xff << (8 - rest)) & 0xff;
  return (bits[whole]! & mask) === mask;
}

/**
 * Calls `fn` for each run of equal bits over sectors [from, to) (fractions rounded outward),
 * where bit 7 of byte 0 stands for sector 0 of the block.
 */
function forEachRun(bits: Buffer, from: number, to: number, fn: (from: number, to: number, present: boolean) => void): void {
  let s = Math.floor(from);
  const end = Math.ceil(to);
  while (s < end) {
    const present = (bits[s >> 3]! & (0x80 >> (s & 7))) !== 0;
    const runStart = s;
    s++;
    while (s < end) {
      if ((s & 7) === 0 && s + 8 <= end && bits[s >> 3] === (present ? 0xff : 0x00)) {
        s += 8;
        continue;
      }
      if (((bits[s >> 3]! & (0x80 >> (s & 7))) !== 0) !== present) break;
      s++;
    }
    fn(runStart, s, present);
  }
}

/**
 * Opens the virtual disk of a fixed or dynamic VHD. Sectors of a dynamic disk that are not
 * allocated, or whose sector-bitmap bit is clear, read as zeros.
 */
export async function openVhd(source: Source, name = `${source.name} (virtual disk)`): Promise<VhdSource> {
  const layout = await readLayout(source);
  const info = toInfo(layout);
  return layout.dynamic ? new DynamicVhdSource(source, layout.dynamic, info, name) : new FixedVhdSource(source, info, name);
}
