import { InputError } from '../../errors.js';

export type ExtFileType = 'file' | 'directory' | 'symlink' | 'character-device' | 'block-device' | 'fifo' | 'socket';

const S_IFMT = 0o170000;
const TYPES: Record<number, ExtFileType> = {
  0o100000: 'file', 0o040000: 'directory', 0o120000: 'symlink', 0o020000: 'character-device',
  0o060000: 'block-device', 0o010000: 'fifo', 0o140000: 'socket',
};

const EXT4_HUGE_FILE_FL = 0x40000;
export const EXT4_EXTENTS_FL = 0x80000;
export const EXT4_EA_INODE_FL = 0x200000;
export const EXT4_INLINE_DATA_FL = 0x10000000;

const EXT4_GOOD_OLD_INODE_SIZE = 128;
/** sizeof(struct ext4_inode) - 128: the extra fields the kernel knows (up to i_projid). */
const EXT4_INODE_CORE_EXTRA = 32;
const NS_PER_S = 1_000_000_000n;

/** One on-disk inode, decoded the way the kernel's ext4_iget does. */
export interface Inode {
  ino: number;
  type: ExtFileType;
  i_mode: number;
  /** i_uid | l_i_uid_high << 16 */
  uid: number;
  gid: number;
  /** i_size_lo | i_size_high << 32 (the high half for regular files, or any file with large_dir). */
  size: number;
  i_links_count: number;
  /** i_blocks in 512-byte units (fs blocks with EXT4_HUGE_FILE_FL). */
  i_blocks: number;
  i_flags: number;
  /** Block holding the inode's extended attributes (i_file_acl), 0 when none. */
  i_file_acl: number;
  mtimeNs: bigint;
  atimeNs: bigint;
  ctimeNs: bigint;
  /** The 60-byte i_block area: block map, extent root, inline data or a fast symlink. */
  i_block: Buffer;
  /** In-inode extended attribute area (after a non-zero i_extra_isize), possibly empty. */
  ibodyXattrs: Buffer;
}

/** Seconds plus the extra word: 2 epoch bits extend the signed 32-bit seconds, 30 bits of nanoseconds. */
function decodeTime(raw: Buffer, secOff: number, extraOff: number, hasExtra: boolean): bigint {
  let sec = BigInt(raw.readInt32LE(secOff));
  let nsec = 0n;
  if (hasExtra) {
    const extra = raw.readUInt32LE(extraOff);
    sec += BigInt(extra & 3) << 32n;
    nsec = BigInt(extra >>> 2);
    // What stat(2) would report is not a valid timespec; tar drops such nanoseconds, and so do we.
    if (nsec >= NS_PER_S) nsec = 0n;
  }
  return sec * NS_PER_S + nsec;
}

export interface InodeGeometry {
  inodeSize: number;
  blockSize: number;
  largeDir: boolean;
  is64: boolean;
  hugeFile: boolean;
}

/** Largest file size any mapping can address: 2^32 logical blocks. */
function maxFileSize(blockSize: number): number {
  return 2 ** 32 * blockSize;
}

export function parseInode(raw: Buffer, ino: number, g: InodeGeometry, input: string): Inode {
  const bad = (problem: string) => new InputError(input, `inode ${ino}: ${problem}`);
  const i_mode = raw.readUInt16LE(0x0);
  const type = TYPES[i_mode & S_IFMT];
  if (!type) throw bad(`i_mode 0${i_mode.toString(8)} has no valid file type`);

  let extra = 0;
  let timeExtra = 0;
  if (g.inodeSize > EXT4_GOOD_OLD_INODE_SIZE) {
    extra = raw.readUInt16LE(0x80);
    if (EXT4_GOOD_OLD_INODE_SIZE + extra > g.inodeSize || extra % 4 !== 0) {
      throw bad(`i_extra_isize ${extra} does not fit the ${g.inodeSize}-byte inode`);
    }
    // As ext4_iget: an unused extra area (0) is taken to hold today's fields, but no xattrs.
    timeExtra = extra || EXT4_INODE_CORE_EXTRA;
  }
  const fits = (off: number) => EXT4_GOOD_OLD_INODE_SIZE + timeExtra >= off + 4;

  const sizeLo = raw.readUInt32LE(0x4);
  const sizeHigh = type === 'file' || g.largeDir ? raw.readUInt32LE(0x6c) : 0;
  const size = sizeHigh * 2 ** 32 + sizeLo;
  if (size > maxFileSize(g.blockSize)) throw bad(`i_size ${size} exceeds what ${g.blockSize}-byte blocks can address`);

  const i_flags = raw.readUInt32LE(0x20);
  let i_blocks = raw.readUInt32LE(0x1c) + (g.hugeFile ? raw.readUInt16LE(0x74) * 2 ** 32 : 0);
  if (g.hugeFile && i_flags & EXT4_HUGE_FILE_FL) i_blocks *= g.blockSize / 512;

  const ibodyStart = EXT4_GOOD_OLD_INODE_SIZE + extra;
  return {
    ino,
    type,
    i_mode,
    uid: (raw.readUInt16LE(0x2) | (raw.readUInt16LE(0x78) << 16)) >>> 0,
    gid: (raw.readUInt16LE(0x18) | (raw.readUInt16LE(0x7a) << 16)) >>> 0,
    size,
    i_links_count: raw.readUInt16LE(0x1a),
    i_blocks,
    i_flags,
    i_file_acl: raw.readUInt32LE(0x68) + (g.is64 ? raw.readUInt16LE(0x76) * 2 ** 32 : 0),
    mtimeNs: decodeTime(raw, 0x10, 0x88, fits(0x88)),
    atimeNs: decodeTime(raw, 0x08, 0x8c, fits(0x8c)),
    ctimeNs: decodeTime(raw, 0x0c, 0x84, fits(0x84)),
    i_block: Buffer.from(raw.subarray(0x28, 0x28 + 60)),
    ibodyXattrs: extra > 0 ? Buffer.from(raw.subarray(ibodyStart, g.inodeSize)) : Buffer.alloc(0),
  };
}

/** Device numbers from i_block: the old 8:8 encoding in word 0, else the new 12:20 one in word 1. */
export function decodeDevice(i_block: Buffer): { major: number; minor: number } {
  const old = i_block.readUInt32LE(0);
  if (old !== 0) return { major: (old >>> 8) & 0xff, minor: old & 0xff };
  const dev = i_block.readUInt32LE(4);
  return { major: (dev & 0xfff00) >>> 8, minor: (dev & 0xff) | ((dev >>> 12) & 0xfff00) };
}
