import { InputError } from '../../errors.js';

/** One name in a directory. */
export interface DirEntry {
  name: Buffer;
  ino: number;
}

export interface DirContext {
  input: string;
  /** Who is being read, for messages: "directory inode 12". */
  owner: string;
  blockSize: number;
  s_inodes_count: number;
  /** Inodes below this (except the root) are reserved and never named in a directory. */
  firstIno: number;
}

const EXT4_ROOT_INO = 2;
const DOT = 0x2e;

/** ext4_dir_rec_len: 8 header bytes plus the name, rounded up to 4. */
function recLenFor(nameLen: number): number {
  return (nameLen + 8 + 3) & ~3;
}

/** rec_len as stored; 64 KiB blocks spell a whole-block record as 0 or 65535 and keep 2 extra bits low. */
function decodeRecLen(raw: number, blockSize: number): number {
  if (blockSize < 65536) return raw;
  if (raw === 0xffff || raw === 0) return blockSize;
  return (raw & 0xfffc) | ((raw & 3) << 16);
}

function isDots(name: Buffer): 0 | 1 | 2 {
  if (name.length === 1 && name[0] === DOT) return 1;
  if (name.length === 2 && name[0] === DOT && name[1] === DOT) return 2;
  return 0;
}

/**
 * Parse the ext4_dir_entry_2 records of one directory block (or one inline-data region),
 * checking each as the kernel's ext4_check_dir_entry does, and append the live names to `out`.
 * `leadingDots` is true for a directory's first block, where "." and ".." may be the first two
 * records (they are skipped); anywhere else they, and any name with "/" or NUL, are errors.
 * Linear reading covers htree directories too: their index blocks present themselves as one
 * empty record (or, in the root block, as the ".." record's padding).
 */
export function parseDirBlock(buf: Buffer, where: string, ctx: DirContext, leadingDots: boolean, out: DirEntry[]): void {
  const bad = (off: number, problem: string) => new InputError(ctx.input, `${ctx.owner}, ${where} offset ${off}: ${problem}`);
  let off = 0;
  let index = 0;
  while (off < buf.length) {
    if (off + 8 > buf.length) throw bad(off, 'directory entry header runs past the end of the block');
    const inode = buf.readUInt32LE(off);
    const rec_len = decodeRecLen(buf.readUInt16LE(off + 4), ctx.blockSize);
    const name_len = buf[off + 6]!;
    if (rec_len < recLenFor(1)) throw bad(off, `rec_len ${rec_len} is smaller than the minimum 12`);
    if (rec_len % 4 !== 0) throw bad(off, `rec_len ${rec_len} is not a multiple of 4`);
    if (rec_len < recLenFor(name_len)) throw bad(off, `rec_len ${rec_len} is too small for name_len ${name_len}`);
    if (off + rec_len > buf.length) throw bad(off, `rec_len ${rec_len} runs past the end of the ${buf.length}-byte block`);
    if (inode !== 0) {
      if (inode > ctx.s_inodes_count) throw bad(off, `inode ${inode} is beyond s_inodes_count ${ctx.s_inodes_count}`);
      if (name_len === 0) throw bad(off, 'entry has an empty name');
      const name = buf.subarray(off + 8, off + 8 + name_len);
      const dots = isDots(name);
      if (dots) {
        if (!leadingDots || index !== dots - 1) throw bad(off, `"${'.'.repeat(dots)}" entry out of place`);
      } else {
        if (name.includes(0x2f) || name.includes(0)) throw bad(off, `name ${JSON.stringify(name.toString('latin1'))} contains "/" or NUL`);
        if (inode < ctx.firstIno && inode !== EXT4_ROOT_INO) throw bad(off, `name refers to reserved inode ${inode}`);
        out.push({ name: Buffer.from(name), ino: inode });
      }
    }
    index++;
    off += rec_len;
  }
}
