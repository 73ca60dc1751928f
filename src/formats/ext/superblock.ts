import { InputError } from '../../errors.js';

/** The ext2/3/4 superblock: the fields this reader needs, checked against each other and the image. */
export interface Superblock {
  s_inodes_count: number;
  /** s_blocks_count_lo | s_blocks_count_hi << 32 (the high half only with 64bit). */
  s_blocks_count: number;
  s_first_data_block: number;
  s_log_block_size: number;
  blockSize: number;
  /** Allocation unit: the block size, or a power-of-two multiple with bigalloc. */
  clusterSize: number;
  s_blocks_per_group: number;
  s_inodes_per_group: number;
  s_rev_level: number;
  s_inode_size: number;
  /** First non-reserved inode (11 before revision 1). */
  s_first_ino: number;
  s_feature_compat: number;
  s_feature_incompat: number;
  s_feature_ro_compat: number;
  s_uuid: string;
  s_volume_name: Buffer;
  /** Group descriptor size: 32, or s_desc_size with 64bit. */
  s_desc_size: number;
  s_first_meta_bg: number;
  s_backup_bgs: [number, number];
  groupCount: number;
}

export const SUPERBLOCK_OFFSET = 1024;
const EXT4_SUPER_MAGIC = 0xef53;

const COMPAT = {
  dir_prealloc: 0x1, imagic_inodes: 0x2, has_journal: 0x4, ext_attr: 0x8, resize_inode: 0x10, dir_index: 0x20,
  lazy_bg: 0x40, exclude_inode: 0x80, exclude_bitmap: 0x100, sparse_super2: 0x200, fast_commit: 0x400,
  stable_inodes: 0x800, orphan_file: 0x1000,
} as const;

export const INCOMPAT = {
  compression: 0x1, filetype: 0x2, needs_recovery: 0x4, journal_dev: 0x8, meta_bg: 0x10, extent: 0x40,
  '64bit': 0x80, mmp: 0x100, flex_bg: 0x200, ea_inode: 0x400, dirdata: 0x1000, metadata_csum_seed: 0x2000,
  large_dir: 0x4000, inline_data: 0x8000, encrypt: 0x10000, casefold: 0x20000,
} as const;

export const RO_COMPAT = {
  sparse_super: 0x1, large_file: 0x2, btree_dir: 0x4, huge_file: 0x8, uninit_bg: 0x10, dir_nlink: 0x20,
  extra_isize: 0x40, snapshot: 0x80, quota: 0x100, bigalloc: 0x200, metadata_csum: 0x400, replica: 0x800,
  read_only: 0x1000, project: 0x2000, shared_blocks: 0x4000, verity: 0x8000, orphan_present: 0x10000,
} as const;

/**
 * Incompatible features this reader understands. Everything else (compression, journal_dev,
 * dirdata, encrypt, casefold, unknown bits) changes how names or data are stored, so the file
 * system is refused rather than misread. needs_recovery is fine: like `mount -o ro,noload`, the
 * journal is not replayed.
 */
const INCOMPAT_SUPPORTED =
  INCOMPAT.filetype | INCOMPAT.needs_recovery | INCOMPAT.meta_bg | INCOMPAT.extent | INCOMPAT['64bit'] |
  INCOMPAT.mmp | INCOMPAT.flex_bg | INCOMPAT.ea_inode | INCOMPAT.metadata_csum_seed | INCOMPAT.large_dir |
  INCOMPAT.inline_data;

function names(table: Record<string, number>, bits: number, kind: string): string[] {
  const out: string[] = [];
  let known = 0;
  for (const [name, bit] of Object.entries(table)) {
    known |= bit;
    if (bits & bit) out.push(name);
  }
  for (let bit = 1; bit !== 0 && bit <= 0x80000000; bit = (bit << 1) >>> 0) {
    if (bits & bit && !(known & bit)) out.push(`${kind}_0x${bit.toString(16)}`);
  }
  return out;
}

export function featureNames(sb: Superblock): string[] {
  return [
    ...names(COMPAT, sb.s_feature_compat, 'compat'),
    ...names(INCOMPAT, sb.s_feature_incompat, 'incompat'),
    ...names(RO_COMPAT, sb.s_feature_ro_compat, 'ro_compat'),
  ];
}

/** The name blkid would give: ext4 when any feature beyond ext3's is on, ext3 with a journal. */
export function fsType(sb: Superblock): 'ext2' | 'ext3' | 'ext4' {
  const ext3Incompat = INCOMPAT.filetype | INCOMPAT.needs_recovery | INCOMPAT.meta_bg;
  const ext3RoCompat = RO_COMPAT.sparse_super | RO_COMPAT.large_file | RO_COMPAT.btree_dir;
  if (sb.s_feature_incompat & ~ext3Incompat || sb.s_feature_ro_compat & ~ext3RoCompat) return 'ext4';
  return sb.s_feature_compat & COMPAT.has_journal ? 'ext3' : 'ext2';
}

function uuidString(b: Buffer): string {
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** Parse and check the 1024-byte superblock found at byte 1024 of the file system. */
export function parseSuperblock(b: Buffer, input: string, imageSize: number): Superblock {
  const bad = (problem: string) => new InputError(input, `not a usable ext2/3/4 file system: ${problem}`);
  const magic = b.readUInt16LE(0x38);
  if (magic !== EXT4_SUPER_MAGIC) throw bad(`superblock s_magic is 0x${magic.toString(16)}, expected 0xef53`);

  const s_log_block_size = b.readUInt32LE(0x18);
  if (s_log_block_size > 6) throw bad(`s_log_block_size ${s_log_block_size} is outside 0..6 (1 KiB to 64 KiB blocks)`);
  const blockSize = 1024 << s_log_block_size;

  const s_rev_level = b.readUInt32LE(0x4c);
  if (s_rev_level > 1) throw bad(`unknown s_rev_level ${s_rev_level}`);
  const dynamic = s_rev_level >= 1;

  const s_feature_compat = dynamic ? b.readUInt32LE(0x5c) : 0;
  const s_feature_incompat = dynamic ? b.readUInt32LE(0x60) : 0;
  const s_feature_ro_compat = dynamic ? b.readUInt32LE(0x64) : 0;
  const unsupported = s_feature_incompat & ~INCOMPAT_SUPPORTED;
  if (unsupported) {
    const list = names(INCOMPAT, unsupported, 'incompat').join(', ');
    throw new InputError(input, `ext file system uses incompatible feature(s) this reader cannot read: ${list}`);
  }
  const is64 = (s_feature_incompat & INCOMPAT['64bit']) !== 0;

  const s_inode_size = dynamic ? b.readUInt16LE(0x58) : 128;
  if (s_inode_size < 128 || s_inode_size > blockSize || (s_inode_size & (s_inode_size - 1)) !== 0) {
    throw bad(`s_inode_size ${s_inode_size} is not a power of two between 128 and the ${blockSize}-byte block size`);
  }

  let s_desc_size = 32;
  if (is64) {
    s_desc_size = b.readUInt16LE(0xfe);
    if (s_desc_size < 64 || s_desc_size > 1024 || (s_desc_size & (s_desc_size - 1)) !== 0) {
      throw bad(`s_desc_size ${s_desc_size} is invalid for a 64bit file system`);
    }
  }

  const s_blocks_count = b.readUInt32LE(0x04) + (is64 ? b.readUInt32LE(0x150) * 2 ** 32 : 0);
  const s_first_data_block = b.readUInt32LE(0x14);
  const s_blocks_per_group = b.readUInt32LE(0x20);
  const s_inodes_per_group = b.readUInt32LE(0x28);
  const s_inodes_count = b.readUInt32LE(0x00);
  const clusterRatio = s_feature_ro_compat & RO_COMPAT.bigalloc ? 2 ** Math.min(31, Math.max(0, b.readUInt32LE(0x1c) - s_log_block_size)) : 1;

  if (s_blocks_per_group === 0 || s_blocks_per_group > 8 * blockSize * clusterRatio) {
    throw bad(`s_blocks_per_group ${s_blocks_per_group} is invalid for ${blockSize}-byte blocks`);
  }
  if (s_inodes_per_group === 0 || s_inodes_per_group > 8 * blockSize) {
    throw bad(`s_inodes_per_group ${s_inodes_per_group} is invalid for ${blockSize}-byte blocks`);
  }
  if (s_first_data_block >= s_blocks_count) {
    throw bad(`s_first_data_block ${s_first_data_block} is not below s_blocks_count ${s_blocks_count}`);
  }
  if (s_blocks_count * blockSize > imageSize) {
    throw bad(`s_blocks_count ${s_blocks_count} × ${blockSize}-byte blocks exceeds the ${imageSize}-byte image`);
  }
  const groupCount = Math.ceil((s_blocks_count - s_first_data_block) / s_blocks_per_group);
  if (s_inodes_count !== groupCount * s_inodes_per_group) {
    throw bad(`s_inodes_count ${s_inodes_count} is not ${groupCount} groups × s_inodes_per_group ${s_inodes_per_group}`);
  }

  const nameEnd = b.indexOf(0, 0x78);
  return {
    s_inodes_count,
    s_blocks_count,
    s_first_data_block,
    s_log_block_size,
    blockSize,
    clusterSize: blockSize * clusterRatio,
    s_blocks_per_group,
    s_inodes_per_group,
    s_rev_level,
    s_inode_size,
    s_first_ino: dynamic ? b.readUInt32LE(0x54) : 11,
    s_feature_compat,
    s_feature_incompat,
    s_feature_ro_compat,
    s_uuid: uuidString(b.subarray(0x68, 0x78)),
    s_volume_name: Buffer.from(b.subarray(0x78, nameEnd === -1 || nameEnd > 0x88 ? 0x88 : nameEnd)),
    s_desc_size,
    s_first_meta_bg: b.readUInt32LE(0x104),
    s_backup_bgs: [b.readUInt32LE(0x24c), b.readUInt32LE(0x250)],
    groupCount,
  };
}

function isPowerOf(n: number, base: number): boolean {
  let p = base;
  while (p < n) p *= base;
  return p === n;
}

/** Whether block group `group` starts with a superblock backup (and so a descriptor copy). */
function groupHasSuper(sb: Superblock, group: number): boolean {
  if (group === 0) return true;
  if (sb.s_feature_compat & COMPAT.sparse_super2) return group === sb.s_backup_bgs[0] || group === sb.s_backup_bgs[1];
  if (group <= 1 || !(sb.s_feature_ro_compat & RO_COMPAT.sparse_super)) return true;
  if (group % 2 === 0) return false;
  return isPowerOf(group, 3) || isPowerOf(group, 5) || isPowerOf(group, 7);
}

/**
 * Block holding group descriptor block number `nr`: right after the superblock's block, except
 * that with meta_bg descriptor blocks from s_first_meta_bg on live at the start of each meta group.
 */
export function descriptorBlock(sb: Superblock, nr: number): number {
  const superBlockNr = sb.blockSize === 1024 ? 1 : 0;
  if (!(sb.s_feature_incompat & INCOMPAT.meta_bg) || nr < sb.s_first_meta_bg) return superBlockNr + nr + 1;
  const group = (sb.blockSize / sb.s_desc_size) * nr;
  let hasSuper = groupHasSuper(sb, group) ? 1 : 0;
  // With 1 KiB blocks and s_first_data_block 0 (bigalloc), group 0's first block holds the boot sector.
  if (sb.blockSize === 1024 && nr === 0 && sb.s_first_data_block === 0) hasSuper++;
  return sb.s_first_data_block + group * sb.s_blocks_per_group + hasSuper;
}
