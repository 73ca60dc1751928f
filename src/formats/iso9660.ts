import { InputError } from '../errors.js';
import { checkReadRange, type Source } from './source.js';

/**
 * ISO 9660 (ECMA-119) reader with Rock Ridge (SUSP/RRIP) and Joliet names, working from a
 * Source so the image is never loaded whole.
 *
 * Names come from Rock Ridge when the primary tree carries it (DDK ISOs do), else from the Joliet
 * tree, else from the plain ECMA-119 identifiers (version ";1" and a trailing "." removed).
 * Every on-disk location and length is checked against the image before use.
 */

/** A run of the image holding part of a file, in bytes. */
export interface IsoExtent {
  offset: number;
  length: number;
}

export type IsoNameSource = 'rockridge' | 'joliet' | 'iso9660';

export interface IsoEntry {
  name: string;
  /** Path from the root without a leading "/"; the root is "". */
  path: string;
  isDirectory: boolean;
  size: number;
  /** The file's bytes are these extents concatenated (several for Multi-Extent files). */
  extents: IsoExtent[];
  /** Where `name` came from; lookup falls back to case-insensitive matching for 'iso9660'. */
  nameSource: IsoNameSource;
  /** POSIX mode from the Rock Ridge PX entry, when present. */
  mode?: number;
}

/** The volume descriptor area uses 2048-byte logical sectors whatever the Logical Block Size. */
const SECTOR = 2048;
const FIRST_DESCRIPTOR = 16 * SECTOR;
/** Real images have a handful of descriptors; a run of more means we are reading garbage. */
const MAX_DESCRIPTORS = 64;
/** A 64 MiB directory holds about a million entries; anything larger is a corrupt Data Length. */
const MAX_DIRECTORY_BYTES = 64 * 1024 * 1024;
/** Directories are read in pieces this big; a multiple of SECTOR so records never straddle one. */
const DIRECTORY_READ_BYTES = 32 * SECTOR;
/** Bounds on System Use continuation areas (CE) per record: a CE chain may loop. */
const MAX_CONTINUATIONS = 32;
const MAX_CONTINUATION_BYTES = 64 * 1024;
const MIN_RECORD = 33;

const FLAG_DIRECTORY = 0x02;
const FLAG_ASSOCIATED = 0x04;
const FLAG_MULTI_EXTENT = 0x80;

const NM_CONTINUE = 0x01;
const NM_CURRENT = 0x02;
const NM_PARENT = 0x04;

const JOLIET_ESCAPES = new Set(['%/@', '%/C', '%/E']);
const RRIP_IDENTIFIERS = new Set(['RRIP_1991A', 'IEEE_P1282', 'IEEE_1282']);

/** One Directory Record as stored, before names are chosen. */
interface DirectoryRecord {
  /** Byte offset of the record in the image, for messages. */
  at: number;
  extentLocation: number;
  extendedAttributeLength: number;
  dataLength: number;
  flags: number;
  fileUnitSize: number;
  interleaveGap: number;
  identifier: Buffer;
  systemUse: Buffer;
}

interface SystemUseInfo {
  /** NM content, possibly assembled from continued NM entries. */
  name?: Buffer;
  mode?: number;
  /** CL: the relocated directory's Location of Extent. */
  childLink?: number;
  /** RE: this directory was moved here from a deep path and shows up there through a CL. */
  relocated: boolean;
  /** Saw an RRIP entry or an ER naming RRIP. */
  rockRidge: boolean;
}

function parseRecord(buf: Buffer, pos: number, at: number, image: string): DirectoryRecord {
  const length = buf[pos]!;
  const lenFi = buf[pos + 32]!;
  if (length < MIN_RECORD + 1 || MIN_RECORD + lenFi > length) {
    throw new InputError(image, `directory record at offset ${at}: Length of Directory Record ${length} cannot hold a ${lenFi}-byte File Identifier`);
  }
  // A Padding Field follows an even-length identifier so the System Use field starts even.
  const suStart = MIN_RECORD + lenFi + (lenFi % 2 === 0 ? 1 : 0);
  return {
    at,
    extendedAttributeLength: buf[pos + 1]!,
    // Both-endian fields: the little-endian half, as the Linux kernel reads them.
    extentLocation: buf.readUInt32LE(pos + 2),
    dataLength: buf.readUInt32LE(pos + 10),
    flags: buf[pos + 25]!,
    fileUnitSize: buf[pos + 26]!,
    interleaveGap: buf[pos + 27]!,
    identifier: buf.subarray(pos + MIN_RECORD, pos + MIN_RECORD + lenFi),
    systemUse: buf.subarray(pos + Math.min(suStart, length), pos + length),
  };
}

function isDotRecord(rec: DirectoryRecord): boolean {
  return rec.identifier.length === 1 && (rec.identifier[0] === 0 || rec.identifier[0] === 1);
}

function decodeUcs2(raw: Buffer): string {
  // UTF-16LE decoding of a byte-swapped copy: Node has no big-endian UTF-16 codec.
  const copy = Buffer.from(raw.subarray(0, raw.length & ~1));
  return copy.swap16().toString('utf16le');
}

function splitPath(path: string): string[] {
  return path.split('/').filter((p) => p !== '' && p !== '.');
}

/** A Source over a file's extents, read as one run of bytes. */
class ExtentSource implements Source {
  private readonly starts: number[] = [];

  constructor(
    private readonly image: Source,
    private readonly extents: IsoExtent[],
    readonly size: number,
    readonly name: string,
  ) {
    let start = 0;
    for (const e of extents) {
      this.starts.push(start);
      start += e.length;
    }
  }

  async read(position: number, length: number): Promise<Buffer> {
    checkReadRange(this, position, length);
    const parts: Buffer[] = [];
    let pos = position;
    const end = position + length;
    // Last extent starting at or before pos; extents are few, so a linear scan is enough.
    let i = this.starts.length - 1;
    while (i > 0 && this.starts[i]! > pos) i--;
    while (pos < end) {
      const extent = this.extents[i]!;
      const within = pos - this.starts[i]!;
      const n = Math.min(extent.length - within, end - pos);
      if (n > 0) {
        parts.push(await this.image.read(extent.offset + within, n));
        pos += n;
      }
      i++;
    }
    return parts.length === 1 ? parts[0]! : Buffer.concat(parts, length);
  }

  async close(): Promise<void> {}
}

export class Iso9660 {
  private constructor(
    private readonly source: Source,
    readonly volumeId: string,
    readonly blockSize: number,
    readonly nameSource: IsoNameSource,
    readonly root: IsoEntry,
    /** LEN_SKP from the SP entry: bytes to skip at the start of each System Use field. */
    private readonly suspSkip: number,
  ) {}

  static async open(source: Source): Promise<Iso9660> {
    const image = source.name;
    const notIso = (): InputError => new InputError(image, 'not an ISO 9660 image (no CD001 volume descriptor)');
    let primary: Buffer | undefined;
    let joliet: Buffer | undefined;
    for (let i = 0; ; i++) {
      const at = FIRST_DESCRIPTOR + i * SECTOR;
      if (at + SECTOR > source.size) {
        if (i === 0) throw notIso();
        throw new InputError(image, `volume descriptor set runs past the end of the image (no Volume Descriptor Set Terminator)`);
      }
      if (i >= MAX_DESCRIPTORS) {
        throw new InputError(image, `no Volume Descriptor Set Terminator within the first ${MAX_DESCRIPTORS} volume descriptors`);
      }
      const vd = await source.read(at, SECTOR);
      if (vd.toString('latin1', 1, 6) !== 'CD001') {
        if (i === 0) throw notIso();
        throw new InputError(image, `volume descriptor ${i} (sector ${16 + i}) has no CD001 Standard Identifier`);
      }
      const type = vd[0];
      if (type === 255) break;
      if (type === 1) primary ??= vd;
      else if (type === 2 && JOLIET_ESCAPES.has(vd.toString('latin1', 88, 91))) joliet ??= vd;
    }
    if (!primary) throw new InputError(image, 'no Primary Volume Descriptor');

    const blockSize = primary.readUInt16LE(128);
    if (blockSize !== 512 && blockSize !== 1024 && blockSize !== 2048) {
      throw new InputError(image, `Logical Block Size ${blockSize} is not 512, 1024 or 2048`);
    }
    const volumeSpaceSize = primary.readUInt32LE(80);
    if (volumeSpaceSize * blockSize > source.size) {
      throw new InputError(
        image,
        `truncated: the Volume Space Size is ${volumeSpaceSize} blocks of ${blockSize} bytes (${volumeSpaceSize * blockSize} bytes) but the image has ${source.size} bytes`,
      );
    }
    const volumeId = primary.toString('latin1', 40, 72).trimEnd();

    const probe = new Iso9660(source, volumeId, blockSize, 'iso9660', rootEntry(primary, blockSize, 'iso9660', image), 0);
    probe.checkExtent(probe.root.extents[0]!, 'the root directory', true);
    const rr = await probe.detectRockRidge();
    if (rr !== undefined) {
      return new Iso9660(source, volumeId, blockSize, 'rockridge', rootEntry(primary, blockSize, 'rockridge', image), rr);
    }
    if (joliet) {
      if (joliet.readUInt16LE(128) !== blockSize) {
        throw new InputError(image, `the Joliet Logical Block Size ${joliet.readUInt16LE(128)} differs from the primary ${blockSize}`);
      }
      const iso = new Iso9660(source, volumeId, blockSize, 'joliet', rootEntry(joliet, blockSize, 'joliet', image), 0);
      iso.checkExtent(iso.root.extents[0]!, 'the Joliet root directory', true);
      return iso;
    }
    return probe;
  }

  /** The entry at `path` ("" or "/" is the root), or undefined when there is none. */
  async lookup(path: string): Promise<IsoEntry | undefined> {
    let entry = this.root;
    // Directories of a path must all differ: a record pointing back up is a loop.
    const seen = new Set<number>([entry.extents[0]!.offset]);
    for (const part of splitPath(path)) {
      if (!entry.isDirectory) return undefined;
      const next = findChild(await this.readDirectory(entry), part);
      if (!next) return undefined;
      if (next.isDirectory) {
        const at = next.extents[0]!.offset;
        if (seen.has(at)) throw new InputError(this.source.name, `directory loop: "${next.path}" points back to one of its ancestors`);
        seen.add(at);
      }
      entry = next;
    }
    return entry;
  }

  /** The entries of a directory, without "." and "..". */
  async list(dir: string | IsoEntry): Promise<IsoEntry[]> {
    const entry = typeof dir === 'string' ? await this.lookup(dir) : dir;
    const shown = typeof dir === 'string' ? dir : dir.path;
    if (!entry) throw new InputError(this.source.name, `no such directory in the image: "${shown}"`);
    if (!entry.isDirectory) throw new InputError(this.source.name, `not a directory in the image: "${shown}"`);
    return this.readDirectory(entry);
  }

  /** Every entry below `dir` (default: the root), depth first, parents before children. */
  async *walk(dir: IsoEntry = this.root): AsyncGenerator<IsoEntry> {
    // ISO 9660 has no directory hard links: reaching a directory twice means a loop or a
    // cross-link, and following it could revisit the tree exponentially often.
    const seen = new Set<number>([dir.extents[0]!.offset]);
    const stack: IsoEntry[] = [dir];
    while (stack.length > 0) {
      const children = await this.readDirectory(stack.pop()!);
      for (const child of children) {
        if (child.isDirectory) {
          const at = child.extents[0]!.offset;
          if (seen.has(at)) throw new InputError(this.source.name, `directory "${child.path}" is reached twice (directory loop or cross-linked directory)`);
          seen.add(at);
        }
      }
      for (const child of children) yield child;
      for (let i = children.length - 1; i >= 0; i--) if (children[i]!.isDirectory) stack.push(children[i]!);
    }
  }

  /** A Source over the entry's bytes: its extents concatenated. */
  open(entry: IsoEntry): Source {
    return new ExtentSource(this.source, entry.extents, entry.size, `${this.source.name}:${entry.path}`);
  }

  private checkExtent(extent: IsoExtent, what: string, isDirectory: boolean): void {
    if (extent.length > 0 && extent.offset + extent.length > this.source.size) {
      throw new InputError(
        this.source.name,
        `${what}: Location of Extent (byte ${extent.offset}) and Data Length ${extent.length} lie beyond the end of the ${this.source.size}-byte image`,
      );
    }
    if (isDirectory && extent.length > MAX_DIRECTORY_BYTES) {
      throw new InputError(this.source.name, `${what}: directory Data Length ${extent.length} exceeds ${MAX_DIRECTORY_BYTES} bytes`);
    }
  }

  /** LEN_SKP when the root's "." record starts with an SP entry and RRIP is in use. */
  private async detectRockRidge(): Promise<number | undefined> {
    const extent = this.root.extents[0]!;
    if (extent.length < MIN_RECORD + 1) return undefined;
    const buf = await this.source.read(extent.offset, Math.min(extent.length, SECTOR));
    if (buf[0]! < MIN_RECORD + 1 || buf[0]! > buf.length) return undefined;
    const dot = parseRecord(buf, 0, extent.offset, this.source.name);
    const su = dot.systemUse;
    if (su.length < 7 || su.toString('latin1', 0, 2) !== 'SP' || su[2] !== 7 || su[4] !== 0xbe || su[5] !== 0xef) return undefined;
    const info = await this.readSystemUse(su, `the root directory record at offset ${dot.at}`);
    return info.rockRidge ? su[6]! : undefined;
  }

  /** Walk a System Use field and its continuation areas, collecting the RRIP entries we use. */
  private async readSystemUse(field: Buffer, where: string): Promise<SystemUseInfo> {
    const image = this.source.name;
    const info: SystemUseInfo = { relocated: false, rockRidge: false };
    const nameParts: Buffer[] = [];
    let nameComplete = false;
    let area: Buffer | undefined = field;
    for (let hops = 0; area; hops++) {
      let continuation: { offset: number; length: number } | undefined;
      let pos = 0;
      while (pos + 4 <= area.length) {
        const signature = area.toString('latin1', pos, pos + 2);
        const len = area[pos + 2]!;
        // Zero bytes after the last entry are padding, not an entry.
        if (len < 4) break;
        if (pos + len > area.length) throw new InputError(image, `${where}: System Use entry ${JSON.stringify(signature)} overruns its area`);
        const entry = area.subarray(pos, pos + len);
        pos += len;
        if (signature === 'ST') break;
        switch (signature) {
          case 'CE':
            if (len < 28) throw new InputError(image, `${where}: CE entry is ${len} bytes, expected 28`);
            continuation = { offset: entry.readUInt32LE(4) * this.blockSize + entry.readUInt32LE(12), length: entry.readUInt32LE(20) };
            break;
          case 'NM': {
            info.rockRidge = true;
            const flags = entry[4] ?? 0;
            if (nameComplete || flags & (NM_CURRENT | NM_PARENT)) break;
            nameParts.push(entry.subarray(5));
            if (!(flags & NM_CONTINUE)) nameComplete = true;
            break;
          }
          case 'PX':
            info.rockRidge = true;
            if (len >= 12) info.mode = entry.readUInt32LE(4);
            break;
          case 'CL':
            info.rockRidge = true;
            if (len < 12) throw new InputError(image, `${where}: CL entry is ${len} bytes, expected 12`);
            info.childLink = entry.readUInt32LE(4);
            break;
          case 'RE':
            info.rockRidge = true;
            info.relocated = true;
            break;
          case 'RR':
          case 'TF':
          case 'SL':
          case 'PL':
            info.rockRidge = true;
            break;
          case 'ER': {
            const idLength = entry[4] ?? 0;
            if (RRIP_IDENTIFIERS.has(entry.toString('latin1', 8, Math.min(len, 8 + idLength)))) info.rockRidge = true;
            break;
          }
        }
      }
      if (!continuation) break;
      if (hops >= MAX_CONTINUATIONS) throw new InputError(image, `${where}: more than ${MAX_CONTINUATIONS} System Use continuation areas (CE loop?)`);
      if (continuation.length > MAX_CONTINUATION_BYTES || continuation.offset + continuation.length > this.source.size) {
        throw new InputError(image, `${where}: CE continuation area of ${continuation.length} bytes at offset ${continuation.offset} lies outside the image`);
      }
      area = await this.source.read(continuation.offset, continuation.length);
    }
    if (nameParts.length > 0) info.name = Buffer.concat(nameParts);
    return info;
  }

  /** Records of a directory in order, with Multi-Extent runs gathered; "." and ".." left out. */
  private async readRecords(dir: IsoEntry): Promise<DirectoryRecord[][]> {
    const image = this.source.name;
    const { offset: start, length } = dir.extents[0]!;
    const end = start + length;
    const files: DirectoryRecord[][] = [];
    let pending: DirectoryRecord[] | undefined;
    for (let chunkStart = start; chunkStart < end; ) {
      // Chunks end on absolute sector boundaries, which no Directory Record crosses.
      const chunkEnd = Math.min(end, (Math.floor(chunkStart / SECTOR) + DIRECTORY_READ_BYTES / SECTOR) * SECTOR);
      const buf = await this.source.read(chunkStart, chunkEnd - chunkStart);
      let pos = 0;
      while (pos < buf.length) {
        const at = chunkStart + pos;
        const len = buf[pos]!;
        if (len === 0) {
          // Unused bytes up to the next block are zero; anything else would be records we skip.
          const next = Math.min(buf.length, (Math.floor(at / this.blockSize) + 1) * this.blockSize - chunkStart);
          if (buf.subarray(pos, next).some((b) => b !== 0)) {
            throw new InputError(image, `directory "${dir.path || '/'}": Length of Directory Record is 0 at offset ${at} but the rest of the block is not zero padding`);
          }
          pos = next;
          continue;
        }
        const sectorEnd = (Math.floor(at / SECTOR) + 1) * SECTOR;
        if (pos + len > buf.length || at + len > sectorEnd) {
          throw new InputError(image, `directory "${dir.path || '/'}": the ${len}-byte Directory Record at offset ${at} crosses a sector boundary or the end of the directory`);
        }
        const rec = parseRecord(buf, pos, at, image);
        pos += len;
        if (isDotRecord(rec) || rec.flags & FLAG_ASSOCIATED) continue;
        if (pending && !pending[0]!.identifier.equals(rec.identifier)) {
          throw new InputError(image, `directory "${dir.path || '/'}": Multi-Extent file at offset ${pending[0]!.at} is not followed by its next extent`);
        }
        const run: DirectoryRecord[] = pending ?? [];
        run.push(rec);
        if (rec.flags & FLAG_MULTI_EXTENT) {
          pending = run;
        } else {
          pending = undefined;
          files.push(run);
        }
      }
      chunkStart = chunkEnd;
    }
    if (pending) throw new InputError(image, `directory "${dir.path || '/'}": the directory ends inside a Multi-Extent file`);
    return files;
  }

  private async readDirectory(dir: IsoEntry): Promise<IsoEntry[]> {
    const image = this.source.name;
    const entries: IsoEntry[] = [];
    for (const run of await this.readRecords(dir)) {
      const first = run[0]!;
      const where = `directory record at offset ${first.at}`;
      let info: SystemUseInfo = { relocated: false, rockRidge: false };
      if (this.nameSource === 'rockridge') info = await this.readSystemUse(first.systemUse.subarray(this.suspSkip), where);
      if (info.relocated) continue;

      const { name, nameSource } = this.chooseName(first, info, where);
      const path = dir.path ? `${dir.path}/${name}` : name;
      let isDirectory = (first.flags & FLAG_DIRECTORY) !== 0;
      let extents: IsoExtent[];
      if (info.childLink !== undefined) {
        // A deep directory relocated by the writer: the placeholder's CL names the real one.
        isDirectory = true;
        extents = [await this.childLinkExtent(info.childLink, path)];
      } else {
        if (isDirectory && run.length > 1) throw new InputError(image, `${where}: directory "${path}" has several extents`);
        extents = run.map((rec) => {
          if (rec.fileUnitSize !== 0 || rec.interleaveGap !== 0) {
            throw new InputError(image, `${where}: "${path}" is recorded in interleaved mode, which is not supported`);
          }
          return { offset: (rec.extentLocation + rec.extendedAttributeLength) * this.blockSize, length: rec.dataLength };
        });
      }
      for (const extent of extents) this.checkExtent(extent, `"${path}"`, isDirectory);
      const entry: IsoEntry = {
        name,
        path,
        isDirectory,
        size: extents.reduce((sum, e) => sum + e.length, 0),
        extents,
        nameSource,
      };
      if (info.mode !== undefined) entry.mode = info.mode;
      if (dir === this.root && this.nameSource === 'rockridge' && isDirectory && (await this.isRelocationDirectory(first, entry))) continue;
      entries.push(entry);
    }
    return entries;
  }

  private chooseName(rec: DirectoryRecord, info: SystemUseInfo, where: string): { name: string; nameSource: IsoNameSource } {
    let name: string;
    let nameSource: IsoNameSource;
    if (info.name) {
      name = info.name.toString('utf8');
      nameSource = 'rockridge';
    } else if (this.nameSource === 'joliet') {
      if (rec.identifier.length % 2 !== 0) throw new InputError(this.source.name, `${where}: Joliet File Identifier has an odd length`);
      name = decodeUcs2(rec.identifier).replace(/;\d+$/, '');
      nameSource = 'joliet';
    } else {
      name = rec.identifier.toString('latin1');
      if (!(rec.flags & FLAG_DIRECTORY)) name = name.replace(/;\d+$/, '').replace(/\.$/, '');
      nameSource = 'iso9660';
    }
    // Names are data: one that could climb out of a directory is refused, not repaired.
    if (name === '' || name === '.' || name === '..' || name.includes('/') || name.includes('\0')) {
      throw new InputError(this.source.name, `${where}: unusable file name ${JSON.stringify(name)}`);
    }
    return { name, nameSource };
  }

  /** The extent of a relocated directory: its "." record gives the Data Length. */
  private async childLinkExtent(location: number, path: string): Promise<IsoExtent> {
    const offset = location * this.blockSize;
    if (offset + MIN_RECORD + 1 > this.source.size) {
      throw new InputError(this.source.name, `"${path}": CL Location of Extent (block ${location}) lies beyond the end of the image`);
    }
    const buf = await this.source.read(offset, Math.min(SECTOR, this.source.size - offset));
    if (buf[0]! < MIN_RECORD + 1 || buf[0]! > buf.length) {
      throw new InputError(this.source.name, `"${path}": CL points to block ${location}, which holds no directory`);
    }
    const dot = parseRecord(buf, 0, offset, this.source.name);
    if (!isDotRecord(dot) || dot.extentLocation !== location) {
      throw new InputError(this.source.name, `"${path}": CL points to block ${location}, which holds no directory`);
    }
    return { offset, length: dot.dataLength };
  }

  /**
   * Writers that relocate deep directories park them in a root directory (rr_moved) whose
   * entries all carry RE; like libarchive, we hide it once its content shows up at its real place.
   */
  private async isRelocationDirectory(rec: DirectoryRecord, entry: IsoEntry): Promise<boolean> {
    if (!/^\.?rr_moved$/i.test(rec.identifier.toString('latin1'))) return false;
    const runs = await this.readRecords(entry);
    if (runs.length === 0) return false;
    for (const run of runs) {
      const info = await this.readSystemUse(run[0]!.systemUse.subarray(this.suspSkip), `directory record at offset ${run[0]!.at}`);
      if (!info.relocated) return false;
    }
    return true;
  }
}

function rootEntry(descriptor: Buffer, blockSize: number, nameSource: IsoNameSource, image: string): IsoEntry {
  // The Directory Record for Root Directory is 34 bytes at offset 156 of the descriptor.
  if (descriptor[156] !== 34) throw new InputError(image, `the Directory Record for Root Directory has length ${descriptor[156]}, expected 34`);
  const rec = parseRecord(descriptor.subarray(156, 190), 0, 0, image);
  const offset = (rec.extentLocation + rec.extendedAttributeLength) * blockSize;
  return { name: '', path: '', isDirectory: true, size: rec.dataLength, extents: [{ offset, length: rec.dataLength }], nameSource };
}

function findChild(children: IsoEntry[], name: string): IsoEntry | undefined {
  const exact = children.find((c) => c.name === name);
  if (exact) return exact;
  // Plain ECMA-119 names are upper case by rule; users type them as they see them elsewhere.
  const folded = name.toUpperCase();
  return children.find((c) => c.nameSource === 'iso9660' && c.name.toUpperCase() === folded);
}
