import { InputError, throwIfAborted } from '../../errors.js';
import type { Source } from '../source.js';
import { blockMapRuns, directRuns } from './blockmap.js';
import { parseDirBlock, type DirContext, type DirEntry } from './dir.js';
import { extentRuns, rootExtentRuns } from './extents.js';
import {
  EXT4_EA_INODE_FL, EXT4_EXTENTS_FL, EXT4_INLINE_DATA_FL, decodeDevice, parseInode,
  type ExtFileType, type Inode, type InodeGeometry,
} from './inode.js';
import { INCOMPAT, RO_COMPAT, SUPERBLOCK_OFFSET, descriptorBlock, featureNames, fsType, parseSuperblock, type Superblock } from './superblock.js';
import type { Run, Volume } from './volume.js';
import {
  EXT4_XATTR_INDEX_SYSTEM, EXT4_XATTR_MAGIC, XATTR_BLOCK_HEADER, aclToXattr, isPosixAcl, parseXattrEntries, visibleName,
  type RawXattr,
} from './xattr.js';

export type { ExtFileType } from './inode.js';

/** One file, directory or other node of the tree, with what `lstat`, `readlink` and `getxattr` report. */
export interface ExtEntry {
  /** Raw bytes relative to the root, components joined by "/"; the root itself is empty. */
  path: Buffer;
  ino: number;
  type: ExtFileType;
  /** Permission bits (07777). */
  mode: number;
  uid: number;
  gid: number;
  size: number;
  nlink: number;
  mtimeNs: bigint;
  atimeNs: bigint;
  ctimeNs: bigint;
  /** For symlinks: the target, raw bytes. */
  symlinkTarget?: Buffer;
  devmajor: number;
  devminor: number;
  /** Extended attributes as listxattr/getxattr show them, in the kernel's listing order. */
  xattrs: Map<string, Buffer>;
}

export interface ExtInfo {
  type: 'ext2' | 'ext3' | 'ext4';
  blockSize: number;
  blocksCount: number;
  inodesCount: number;
  label: string;
  uuid: string;
  features: string[];
}

const EXT4_ROOT_INO = 2;
const SLASH = Buffer.from('/');
/** Size of each read of file data: large sequential reads, bounded memory. */
const READ_CHUNK = 1 << 20;
/** Reads kept in flight while the consumer handles the previous chunk. */
const READ_AHEAD = 2;
/**
 * Small data reads that follow each other closely on disk (small files written in sequence, as
 * installers and mke2fs lay them out) are served from one larger read: each read call costs far
 * more than copying a few more kilobytes.
 */
const SMALL_READ = 64 * 1024;
const WINDOW = 256 * 1024;
/** Bytes of inode-table, descriptor and xattr blocks kept in memory. */
const CACHE_BYTES = 4 << 20;
/** A sanity bound on one directory's names (ext4's own limits are far below this in practice). */
const MAX_DIR_ENTRIES = 10_000_000;
/** Symlinks followed by lookup before giving up, as the kernel's MAXSYMLINKS. */
const MAX_SYMLINKS = 40;
/** Inline symlink length the kernel would read (fast symlinks fit in i_block minus a NUL). */
const FAST_SYMLINK_MAX = 59;

function printable(path: Buffer): string {
  return path.length ? JSON.stringify(path.toString('utf8')) : 'the root directory';
}

function compareNames(a: DirEntry, b: DirEntry): number {
  return Buffer.compare(a.name, b.name);
}

/**
 * An ext2/ext3/ext4 file system read in-process from a Source, as `mount -o ro,noload` would
 * show it: no journal replay, nothing written. Every on-disk number is checked before it is
 * used, and corrupt structures end in an InputError naming the source.
 */
export class ExtFileSystem {
  readonly info: ExtInfo;
  private readonly input: string;
  private readonly geometry: InodeGeometry;
  private readonly vol: Volume;
  private readonly dirContext: Omit<DirContext, 'owner'>;
  private readonly cache = new Map<number, Promise<Buffer>>();
  private readonly inodeTables = new Map<number, number>();
  /** The inode behind each entry handed out, so that reading its data need not parse it again. */
  private readonly inodes = new WeakMap<object, Inode>();
  private window: { start: number; data: Promise<Buffer> } | undefined;
  private lastReadEnd = -1;

  private constructor(
    private readonly source: Source,
    private readonly sb: Superblock,
  ) {
    this.input = source.name;
    this.info = {
      type: fsType(sb),
      blockSize: sb.blockSize,
      blocksCount: sb.s_blocks_count,
      inodesCount: sb.s_inodes_count,
      label: sb.s_volume_name.toString('utf8'),
      uuid: sb.s_uuid,
      features: featureNames(sb),
    };
    this.geometry = {
      inodeSize: sb.s_inode_size,
      blockSize: sb.blockSize,
      largeDir: (sb.s_feature_incompat & INCOMPAT.large_dir) !== 0,
      is64: (sb.s_feature_incompat & INCOMPAT['64bit']) !== 0,
      hugeFile: (sb.s_feature_ro_compat & RO_COMPAT.huge_file) !== 0,
    };
    this.dirContext = { input: this.input, blockSize: sb.blockSize, s_inodes_count: sb.s_inodes_count, firstIno: sb.s_first_ino };
    const checkBlocks = (block: number, count: number, what: string): void => {
      if (!Number.isSafeInteger(block) || count < 1 || block <= sb.s_first_data_block || block + count > sb.s_blocks_count) {
        const range = count > 1 ? `blocks ${block}..${block + count - 1}` : `block ${block}`;
        throw new InputError(this.input, `${what}: ${range} lies outside the file system (data blocks ${sb.s_first_data_block + 1}..${sb.s_blocks_count - 1})`);
      }
    };
    this.vol = {
      input: this.input,
      blockSize: sb.blockSize,
      checkBlocks,
      readBlocks: async (block, count, what) => {
        checkBlocks(block, count, what);
        const [position, length] = [block * sb.blockSize, count * sb.blockSize];
        return source.readSync?.(position, length) ?? source.read(position, length);
      },
    };
  }

  /** Read and check the superblock and the root inode. The caller keeps ownership of `source`. */
  static async open(source: Source): Promise<ExtFileSystem> {
    if (source.size < SUPERBLOCK_OFFSET + 1024) throw new InputError(source.name, 'too small to hold an ext2/3/4 superblock');
    const sb = parseSuperblock(await source.read(SUPERBLOCK_OFFSET, 1024), source.name, source.size);
    const fs = new ExtFileSystem(source, sb);
    const root = await fs.liveInode(EXT4_ROOT_INO, Buffer.alloc(0));
    if (root.type !== 'directory') throw new InputError(source.name, `root inode 2 is a ${root.type}, not a directory`);
    return fs;
  }

  /**
   * The whole tree, depth first, root first (path empty), each directory's names in raw byte
   * order, "." and ".." left out. A directory reached twice (a cycle) is an error.
   */
  async *walk(opts: { signal?: AbortSignal } = {}): AsyncGenerator<ExtEntry> {
    const root = await this.liveInode(EXT4_ROOT_INO, Buffer.alloc(0));
    yield await this.entry(Buffer.alloc(0), root);
    const seen = new Set<number>([EXT4_ROOT_INO]);
    const stack: { path: Buffer; names: DirEntry[]; next: number }[] = [{ path: Buffer.alloc(0), names: await this.readDir(root), next: 0 }];
    while (stack.length > 0) {
      throwIfAborted(opts.signal);
      const top = stack[stack.length - 1]!;
      const d = top.names[top.next++];
      if (!d) {
        stack.pop();
        continue;
      }
      const path = top.path.length ? Buffer.concat([top.path, SLASH, d.name]) : d.name;
      const inode = await this.liveInode(d.ino, path);
      yield await this.entry(path, inode);
      if (inode.type === 'directory') {
        if (seen.has(inode.ino)) throw new InputError(this.input, `directory inode ${inode.ino} is reached a second time at ${printable(path)} (a directory cycle or hard-linked directory)`);
        seen.add(inode.ino);
        stack.push({ path, names: await this.readDir(inode), next: 0 });
      }
    }
  }

  /**
   * Find a path relative to the root ("etc/os-release"). Symlinks in the middle are followed
   * inside this file system, as if it were the root (absolute targets start at its root, ".."
   * stops there); the last component is followed only with `follow`. Undefined when not found.
   */
  async lookup(path: string | Buffer, opts: { follow?: boolean } = {}): Promise<ExtEntry | undefined> {
    const split = (p: Buffer) => {
      const parts: Buffer[] = [];
      let start = 0;
      for (let i = 0; i <= p.length; i++) {
        if (i === p.length || p[i] === 0x2f) {
          const c = p.subarray(start, i);
          if (c.length && !(c.length === 1 && c[0] === 0x2e)) parts.push(c);
          start = i + 1;
        }
      }
      return parts;
    };
    const raw = typeof path === 'string' ? Buffer.from(path) : path;
    const root: { inode: Inode; path: Buffer } = { inode: await this.liveInode(EXT4_ROOT_INO, Buffer.alloc(0)), path: Buffer.alloc(0) };
    let chain = [root];
    const queue = split(raw);
    let hops = 0;
    while (queue.length > 0) {
      const c = queue.shift()!;
      if (c.equals(Buffer.from('..'))) {
        if (chain.length > 1) chain.pop();
        continue;
      }
      const cur = chain[chain.length - 1]!;
      if (cur.inode.type !== 'directory') return undefined;
      const found = (await this.readDir(cur.inode)).find((d) => d.name.equals(c));
      if (!found) return undefined;
      const childPath = cur.path.length ? Buffer.concat([cur.path, SLASH, c]) : Buffer.from(c);
      const inode = await this.liveInode(found.ino, childPath);
      if (inode.type === 'symlink' && (queue.length > 0 || opts.follow)) {
        if (++hops > MAX_SYMLINKS) throw new InputError(this.input, `too many levels of symbolic links resolving ${printable(raw)}`);
        const target = await this.readLink(inode);
        if (target[0] === 0x2f) chain = [root];
        queue.unshift(...split(target));
        continue;
      }
      chain.push({ inode, path: childPath });
    }
    const last = chain[chain.length - 1]!;
    return this.entry(last.path, last.inode);
  }

  /**
   * A regular file's contents: exactly `size` bytes in chunks of up to 1 MiB, holes and
   * unwritten extents as zeros, with a little read-ahead.
   */
  async *readFile(entry: { ino: number }, opts: { signal?: AbortSignal } = {}): AsyncGenerator<Buffer> {
    const known = this.inodes.get(entry);
    const inode = known?.ino === entry.ino ? known : await this.readInode(entry.ino);
    if (inode.type !== 'file') throw new InputError(this.input, `inode ${entry.ino} is a ${inode.type}, not a regular file`);
    yield* this.data(inode, inode.size, opts.signal);
  }

  /**
   * A small file's whole data at once, where nothing has to be waited for: its mapping is in the
   * inode itself (inline data, an extent tree that is only its root, or direct block pointers) and
   * the source has the bytes at hand (Source.readSync). Undefined otherwise, and for an entry that
   * walk or lookup did not give: read it with readFile. Tens of thousands of small files each went
   * through readFile's chain of async generators, the export's largest cost per file.
   */
  readFileNow(entry: { ino: number }): Buffer | undefined {
    const inode = this.inodes.get(entry);
    if (!inode || inode.ino !== entry.ino || inode.type !== 'file' || inode.size > SMALL_READ) return undefined;
    const { size } = inode;
    if (inode.i_flags & EXT4_INLINE_DATA_FL) {
      const inline = this.inlineData(inode);
      if (inline.length >= size) return inline.subarray(0, size);
      const out = Buffer.alloc(size);
      inline.copy(out);
      return out;
    }
    const { source } = this;
    if (!source.readSync) return undefined;
    const owner = `inode ${inode.ino}`;
    const bs = this.sb.blockSize;
    const runs = inode.i_flags & EXT4_EXTENTS_FL ? rootExtentRuns(this.vol, inode.i_block, owner) : directRuns(this.vol, inode.i_block, Math.ceil(size / bs), owner);
    if (!runs) return undefined;
    const [first] = runs;
    // The usual case: one written run from block 0 holding every byte.
    if (first && runs.length === 1 && first.logical === 0 && !first.unwritten && first.length * bs >= size) return source.readSync(first.physical * bs, size);
    // Holes and unwritten extents read as zeros, as in readFile.
    const out = Buffer.alloc(size);
    for (const run of runs) {
      const start = run.logical * bs;
      if (start >= size) break;
      if (run.unwritten) continue;
      const part = source.readSync(run.physical * bs, Math.min(size, (run.logical + run.length) * bs) - start);
      if (!part) return undefined;
      part.copy(out, start);
    }
    return out;
  }

  /** A directory's names as readdir(3) lists them, "." and ".." left out, sorted by raw bytes. */
  async readdir(entry: { ino: number }): Promise<Buffer[]> {
    const inode = await this.readInode(entry.ino);
    if (inode.type !== 'directory') throw new InputError(this.input, `inode ${entry.ino} is a ${inode.type}, not a directory`);
    return (await this.readDir(inode)).map((d) => d.name);
  }

  private async entry(path: Buffer, inode: Inode): Promise<ExtEntry> {
    const dev = inode.type === 'character-device' || inode.type === 'block-device' ? decodeDevice(inode.i_block) : { major: 0, minor: 0 };
    const e: ExtEntry = {
      path,
      ino: inode.ino,
      type: inode.type,
      mode: inode.i_mode & 0o7777,
      uid: inode.uid,
      gid: inode.gid,
      size: inode.size,
      nlink: inode.i_links_count,
      mtimeNs: inode.mtimeNs,
      atimeNs: inode.atimeNs,
      ctimeNs: inode.ctimeNs,
      devmajor: dev.major,
      devminor: dev.minor,
      xattrs: await this.readXattrs(inode),
    };
    if (inode.type === 'symlink') e.symlinkTarget = await this.readLink(inode);
    this.inodes.set(e, inode);
    return e;
  }

  private cachedBlock(block: number, what: string): Promise<Buffer> {
    let p = this.cache.get(block);
    if (p) {
      this.cache.delete(block);
    } else {
      p = this.vol.readBlocks(block, 1, what);
      // A failed read must not stay cached.
      p.catch(() => this.cache.delete(block));
      if (this.cache.size * this.sb.blockSize >= CACHE_BYTES) this.cache.delete(this.cache.keys().next().value!);
    }
    this.cache.set(block, p);
    return p;
  }

  private async inodeTable(group: number): Promise<number> {
    const known = this.inodeTables.get(group);
    if (known !== undefined) return known;
    const { sb } = this;
    const perBlock = sb.blockSize / sb.s_desc_size;
    const nr = Math.floor(group / perBlock);
    const desc = await this.cachedBlock(descriptorBlock(sb, nr), `group descriptor block ${nr}`);
    const off = (group % perBlock) * sb.s_desc_size;
    const lo = desc.readUInt32LE(off + 0x8);
    const hi = sb.s_desc_size >= 64 ? desc.readUInt32LE(off + 0x28) : 0;
    const table = hi * 2 ** 32 + lo;
    this.vol.checkBlocks(table, Math.ceil((sb.s_inodes_per_group * sb.s_inode_size) / sb.blockSize), `group ${group} bg_inode_table`);
    this.inodeTables.set(group, table);
    return table;
  }

  private async readInode(ino: number): Promise<Inode> {
    const { sb } = this;
    if (!Number.isInteger(ino) || ino < 1 || ino > sb.s_inodes_count) {
      throw new InputError(this.input, `inode ${ino} is outside 1..s_inodes_count ${sb.s_inodes_count}`);
    }
    const group = Math.floor((ino - 1) / sb.s_inodes_per_group);
    const byteOff = ((ino - 1) % sb.s_inodes_per_group) * sb.s_inode_size;
    const table = await this.inodeTable(group);
    const block = await this.cachedBlock(table + Math.floor(byteOff / sb.blockSize), `inode table of group ${group}`);
    const at = byteOff % sb.blockSize;
    return parseInode(block.subarray(at, at + sb.s_inode_size), ino, this.geometry, this.input);
  }

  /** An inode named in a directory: it must be in use, as the kernel's iget requires. */
  private async liveInode(ino: number, path: Buffer): Promise<Inode> {
    const inode = await this.readInode(ino);
    if (inode.i_links_count === 0) throw new InputError(this.input, `${printable(path)} names inode ${ino}, which is not in use (i_links_count 0)`);
    if (inode.i_flags & EXT4_INLINE_DATA_FL && !(this.sb.s_feature_incompat & INCOMPAT.inline_data)) {
      throw new InputError(this.input, `inode ${ino} has inline data but the file system lacks the inline_data feature`);
    }
    return inode;
  }

  private runs(inode: Inode): AsyncGenerator<Run> {
    const owner = `inode ${inode.ino}`;
    if (inode.i_flags & EXT4_EXTENTS_FL) return extentRuns(this.vol, inode.i_block, owner);
    return blockMapRuns(this.vol, inode.i_block, Math.ceil(inode.size / this.sb.blockSize), owner);
  }

  /** Exactly `length` bytes of an inode's data, from its mapping or inline data. */
  private async *data(inode: Inode, length: number, signal?: AbortSignal): AsyncGenerator<Buffer> {
    const pending: Promise<Buffer>[] = [];
    for await (const { read } of this.chunks(inode, length)) {
      throwIfAborted(signal);
      read.catch(() => undefined);
      pending.push(read);
      if (pending.length >= READ_AHEAD) yield await pending.shift()!;
    }
    while (pending.length > 0) {
      throwIfAborted(signal);
      yield await pending.shift()!;
    }
  }

  /**
   * The reads making up `length` bytes of data, each already started when generated (wrapped,
   * because an async generator would await a bare promise).
   */
  private async *chunks(inode: Inode, length: number): AsyncGenerator<{ read: Promise<Buffer> }> {
    const bs = this.sb.blockSize;
    let pos = 0;
    const zeros = function* (upTo: number): Generator<{ read: Promise<Buffer> }> {
      while (pos < upTo) {
        const n = Math.min(READ_CHUNK, upTo - pos);
        pos += n;
        yield { read: Promise.resolve(Buffer.alloc(n)) };
      }
    };
    if (inode.i_flags & EXT4_INLINE_DATA_FL) {
      const inline = this.inlineData(inode);
      pos = Math.min(length, inline.length);
      yield { read: Promise.resolve(inline.subarray(0, pos)) };
      yield* zeros(length);
      return;
    }
    for await (const run of this.runs(inode)) {
      const start = run.logical * bs;
      if (start >= length) break;
      yield* zeros(start);
      const end = Math.min(length, (run.logical + run.length) * bs);
      if (run.unwritten) {
        yield* zeros(end);
        continue;
      }
      while (pos < end) {
        const n = Math.min(READ_CHUNK, end - pos);
        yield { read: this.readData(run.physical * bs + (pos - start), n) };
        pos += n;
      }
    }
    yield* zeros(length);
  }

  /** Bytes of file data; see SMALL_READ. */
  private readData(position: number, length: number): Promise<Buffer> {
    // A source that has the bytes at hand gives them at once: no window needed.
    const now = length <= SMALL_READ ? this.source.readSync?.(position, length) : undefined;
    if (now) return Promise.resolve(now);
    const sequential = position >= this.lastReadEnd && position - this.lastReadEnd < SMALL_READ;
    this.lastReadEnd = position + length;
    if (length > SMALL_READ) return this.source.read(position, length);
    const w = this.window;
    if (w && position >= w.start && position + length <= w.start + WINDOW) {
      return w.data.then((d) => {
        if (position + length > w.start + d.length) return this.source.read(position, length);
        return d.subarray(position - w.start, position - w.start + length);
      });
    }
    if (!sequential) return this.source.read(position, length);
    const fsEnd = this.sb.s_blocks_count * this.sb.blockSize;
    const data = this.source.read(position, Math.max(length, Math.min(WINDOW, fsEnd - position)));
    data.catch(() => undefined);
    this.window = { start: position, data };
    return data.then((d) => d.subarray(0, length));
  }

  /** The system.data xattr of an inline-data inode: bytes beyond the 60 in i_block. */
  private inlineXattr(inode: Inode): Buffer {
    const x = this.ibodyXattrs(inode).find((e) => e.e_name_index === EXT4_XATTR_INDEX_SYSTEM && e.name.equals(Buffer.from('data')));
    if (x?.e_value_inum) throw new InputError(this.input, `inode ${inode.ino}: inline data value stored in an xattr inode`);
    return x?.value ?? Buffer.alloc(0);
  }

  private inlineData(inode: Inode): Buffer {
    return Buffer.concat([inode.i_block, this.inlineXattr(inode)]);
  }

  /** A directory's names, "." and ".." left out, sorted by raw bytes; duplicates are an error. */
  private async readDir(inode: Inode): Promise<DirEntry[]> {
    const ctx: DirContext = { ...this.dirContext, owner: `directory inode ${inode.ino}` };
    const out: DirEntry[] = [];
    if (inode.i_flags & EXT4_INLINE_DATA_FL) {
      // i_block holds the parent's inode number, then entries; system.data holds more.
      parseDirBlock(inode.i_block.subarray(4), 'inline data in i_block', ctx, false, out);
      const more = this.inlineXattr(inode);
      if (more.length) parseDirBlock(more, 'inline data in system.data', ctx, false, out);
    } else {
      const bs = this.sb.blockSize;
      const blocks = Math.ceil(inode.size / bs);
      // A directory's blocks are its own: a repeat would list names again (or forever, through indirect blocks).
      const used = new Set<number>();
      for await (const run of this.runs(inode)) {
        if (run.logical >= blocks) break;
        // Holes and unwritten extents hold no entries; readdir skips them too.
        if (run.unwritten) continue;
        const count = Math.min(run.length, blocks - run.logical);
        for (let i = 0; i < count; i++) {
          if (used.has(run.physical + i)) throw new InputError(this.input, `${ctx.owner} uses block ${run.physical + i} twice`);
          used.add(run.physical + i);
        }
        for (let i = 0; i < count; i += READ_CHUNK / bs) {
          const n = Math.min(READ_CHUNK / bs, count - i);
          const data = await this.vol.readBlocks(run.physical + i, n, `${ctx.owner} data`);
          for (let j = 0; j < n; j++) {
            const logical = run.logical + i + j;
            parseDirBlock(data.subarray(j * bs, (j + 1) * bs), `block ${logical}`, ctx, logical === 0, out);
          }
          if (out.length > MAX_DIR_ENTRIES) throw new InputError(this.input, `${ctx.owner} has more than ${MAX_DIR_ENTRIES} entries`);
        }
      }
    }
    out.sort(compareNames);
    for (let i = 1; i < out.length; i++) {
      if (out[i]!.name.equals(out[i - 1]!.name)) throw new InputError(this.input, `${ctx.owner} holds the name ${printable(out[i]!.name)} twice`);
    }
    return out;
  }

  /**
   * A symlink's target as readlink(2) returns it: from inline data, from i_block when the inode
   * has no data blocks (a fast symlink), else from its first data block; cut at the first NUL.
   */
  private async readLink(inode: Inode): Promise<Buffer> {
    let raw: Buffer;
    const eaBlocks = inode.i_file_acl ? this.sb.clusterSize / 512 : 0;
    if (inode.i_flags & EXT4_INLINE_DATA_FL) {
      const inline = this.inlineData(inode);
      raw = inline.subarray(0, Math.min(inode.size, inline.length));
    } else if (inode.i_blocks - eaBlocks === 0) {
      raw = inode.i_block.subarray(0, Math.min(inode.size, FAST_SYMLINK_MAX));
    } else {
      const first = await this.firstRun(inode);
      if (!first || first.logical !== 0 || first.unwritten) throw new InputError(this.input, `inode ${inode.ino}: symlink has no data in its first block`);
      const block = await this.vol.readBlocks(first.physical, 1, `inode ${inode.ino} symlink block`);
      raw = block.subarray(0, Math.min(inode.size, this.sb.blockSize - 1));
    }
    const nul = raw.indexOf(0);
    return Buffer.from(nul === -1 ? raw : raw.subarray(0, nul));
  }

  private async firstRun(inode: Inode): Promise<Run | undefined> {
    const it = this.runs(inode);
    try {
      const r = await it.next();
      return r.done ? undefined : r.value;
    } finally {
      await it.return(undefined);
    }
  }

  private ibodyXattrs(inode: Inode): RawXattr[] {
    const area = inode.ibodyXattrs;
    if (area.length < 4 || area.readUInt32LE(0) !== EXT4_XATTR_MAGIC) return [];
    return parseXattrEntries(area, 4, 4, `inode ${inode.ino} in-inode xattrs`, this.input);
  }

  private async blockXattrs(inode: Inode): Promise<RawXattr[]> {
    if (!inode.i_file_acl) return [];
    const where = `inode ${inode.ino} xattr block ${inode.i_file_acl}`;
    const block = await this.cachedBlock(inode.i_file_acl, `inode ${inode.ino} i_file_acl`);
    const h_magic = block.readUInt32LE(0);
    if (h_magic !== EXT4_XATTR_MAGIC) throw new InputError(this.input, `${where}: h_magic is 0x${h_magic.toString(16)}, expected 0xea020000`);
    const h_blocks = block.readUInt32LE(8);
    if (h_blocks !== 1) throw new InputError(this.input, `${where}: h_blocks is ${h_blocks}, expected 1`);
    return parseXattrEntries(block, XATTR_BLOCK_HEADER, 0, where, this.input);
  }

  private async readXattrs(inode: Inode): Promise<Map<string, Buffer>> {
    const out = new Map<string, Buffer>();
    const where = `inode ${inode.ino}`;
    for (const x of [...this.ibodyXattrs(inode), ...(await this.blockXattrs(inode))]) {
      const name = visibleName(x, this.input, where);
      if (name === undefined || out.has(name)) continue;
      let value = x.e_value_inum ? await this.eaInodeValue(x, inode) : x.value;
      if (isPosixAcl(x)) value = aclToXattr(value, this.input, `${where} ${name}`);
      out.set(name, value);
    }
    return out;
  }

  /** A value kept in its own inode (ea_inode): that inode's data, which must be exactly e_value_size. */
  private async eaInodeValue(x: RawXattr, owner: Inode): Promise<Buffer> {
    const where = `inode ${owner.ino} xattr value inode ${x.e_value_inum}`;
    if (!(this.sb.s_feature_incompat & INCOMPAT.ea_inode)) throw new InputError(this.input, `${where}: e_value_inum set but the file system lacks ea_inode`);
    const ea = await this.readInode(x.e_value_inum);
    if (ea.type !== 'file' || !(ea.i_flags & EXT4_EA_INODE_FL) || ea.size !== x.e_value_size) {
      throw new InputError(this.input, `${where}: not an xattr inode of ${x.e_value_size} bytes`);
    }
    const parts: Buffer[] = [];
    for await (const chunk of this.data(ea, ea.size)) parts.push(chunk);
    return Buffer.concat(parts);
  }
}
