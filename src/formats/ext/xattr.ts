import { InputError } from '../../errors.js';

export const EXT4_XATTR_MAGIC = 0xea020000;
/** Header of an xattr block; entries follow it. */
export const XATTR_BLOCK_HEADER = 32;
/** Largest value getxattr(2) can return (XATTR_SIZE_MAX). */
const XATTR_SIZE_MAX = 65536;

export const EXT4_XATTR_INDEX_SYSTEM = 7;
const INDEX_POSIX_ACL_ACCESS = 2;
const INDEX_POSIX_ACL_DEFAULT = 3;

/**
 * Name prefixes by e_name_index, for the indexes the kernel lists (listxattr). Others (lustre,
 * system.data for inline data, richacl, encryption) are internal and never shown.
 */
const PREFIXES: Record<number, string> = {
  1: 'user.',
  [INDEX_POSIX_ACL_ACCESS]: 'system.posix_acl_access',
  [INDEX_POSIX_ACL_DEFAULT]: 'system.posix_acl_default',
  4: 'trusted.',
  6: 'security.',
  10: 'gnu.',
};

/** One ext4_xattr_entry with its value, or the inode holding the value (ea_inode). */
export interface RawXattr {
  e_name_index: number;
  name: Buffer;
  value: Buffer;
  e_value_inum: number;
  e_value_size: number;
}

/**
 * Parse the entries of an xattr area: the in-inode area after its magic, or an xattr block after
 * its header. `valueBase` is where e_value_offs counts from (the first entry in an inode, the
 * block start in a block). Each name and value is checked to lie inside the area.
 */
export function parseXattrEntries(area: Buffer, start: number, valueBase: number, where: string, input: string): RawXattr[] {
  const bad = (off: number, problem: string) => new InputError(input, `${where}, xattr entry at offset ${off}: ${problem}`);
  const out: RawXattr[] = [];
  let off = start;
  for (;;) {
    if (off + 4 > area.length) throw bad(off, 'entry list is not terminated');
    if (area.readUInt32LE(off) === 0) return out;
    if (off + 16 > area.length) throw bad(off, 'entry header runs past the end');
    const e_name_len = area[off]!;
    const e_name_index = area[off + 1]!;
    const e_value_offs = area.readUInt16LE(off + 2);
    const e_value_inum = area.readUInt32LE(off + 4);
    const e_value_size = area.readUInt32LE(off + 8);
    const nameEnd = off + 16 + e_name_len;
    if (nameEnd > area.length) throw bad(off, `name of ${e_name_len} bytes runs past the end`);
    if (e_value_size > XATTR_SIZE_MAX) throw bad(off, `e_value_size ${e_value_size} exceeds ${XATTR_SIZE_MAX}`);
    let value = Buffer.alloc(0);
    if (e_value_inum === 0 && e_value_size > 0) {
      const vStart = valueBase + e_value_offs;
      if (vStart < nameEnd || vStart + e_value_size > area.length) {
        throw bad(off, `value (${e_value_size} bytes at e_value_offs ${e_value_offs}) lies outside the area`);
      }
      value = Buffer.from(area.subarray(vStart, vStart + e_value_size));
    }
    out.push({ e_name_index, name: Buffer.from(area.subarray(off + 16, nameEnd)), value, e_value_inum, e_value_size });
    off = (nameEnd + 3) & ~3;
  }
}

/** The name listxattr(2) shows for an entry, or undefined for the kernel's internal ones. */
export function visibleName(x: RawXattr, input: string, where: string): string | undefined {
  const prefix = PREFIXES[x.e_name_index];
  if (prefix === undefined) return undefined;
  const full = Buffer.concat([Buffer.from(prefix), x.name]);
  const text = full.toString('utf8');
  if (!Buffer.from(text, 'utf8').equals(full)) throw new InputError(input, `${where}: xattr name ${JSON.stringify(full.toString('latin1'))} is not valid UTF-8`);
  return text;
}

const ACL_USER_OBJ = 0x01;
const ACL_USER = 0x02;
const ACL_GROUP_OBJ = 0x04;
const ACL_GROUP = 0x08;
const ACL_MASK = 0x10;
const ACL_OTHER = 0x20;
const EXT4_ACL_VERSION = 1;
const POSIX_ACL_XATTR_VERSION = 2;
const ACL_UNDEFINED_ID = 0xffffffff;

export function isPosixAcl(x: RawXattr): boolean {
  return x.e_name_index === INDEX_POSIX_ACL_ACCESS || x.e_name_index === INDEX_POSIX_ACL_DEFAULT;
}

/**
 * ext4 stores ACLs compactly (version 1, 4-byte entries for the owner, group, mask and other
 * tags); getxattr returns the VFS form (version 2, 8-byte entries with e_id 0xffffffff for those).
 * Convert so that we report what the kernel reports.
 */
export function aclToXattr(disk: Buffer, input: string, where: string): Buffer {
  const bad = (problem: string) => new InputError(input, `${where}: POSIX ACL ${problem}`);
  if (disk.length < 4 || disk.readUInt32LE(0) !== EXT4_ACL_VERSION) throw bad('has no version-1 header');
  const entries: Buffer[] = [];
  let off = 4;
  while (off < disk.length) {
    if (off + 4 > disk.length) throw bad('ends inside an entry');
    const tag = disk.readUInt16LE(off);
    const perm = disk.readUInt16LE(off + 2);
    let id = ACL_UNDEFINED_ID;
    if (tag === ACL_USER || tag === ACL_GROUP) {
      if (off + 8 > disk.length) throw bad('ends inside an entry');
      id = disk.readUInt32LE(off + 4);
      off += 8;
    } else if (tag === ACL_USER_OBJ || tag === ACL_GROUP_OBJ || tag === ACL_MASK || tag === ACL_OTHER) {
      off += 4;
    } else {
      throw bad(`has an entry with unknown tag 0x${tag.toString(16)}`);
    }
    const e = Buffer.alloc(8);
    e.writeUInt16LE(tag, 0);
    e.writeUInt16LE(perm, 2);
    e.writeUInt32LE(id, 4);
    entries.push(e);
  }
  const header = Buffer.alloc(4);
  header.writeUInt32LE(POSIX_ACL_XATTR_VERSION, 0);
  return Buffer.concat([header, ...entries]);
}
