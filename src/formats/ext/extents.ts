import { InputError } from '../../errors.js';
import type { Run, Volume } from './volume.js';

const EXT4_EXT_MAGIC = 0xf30a;
const EXT4_MAX_EXTENT_DEPTH = 5;
const EXT_INIT_MAX_LEN = 32768;
const EXT_MAX_BLOCKS = 2 ** 32;
const ENTRY = 12;

/** The InputError of a corrupt node: the inode, the node, the problem. */
const badIn = (vol: Volume, owner: string, where: string) => (problem: string) => new InputError(vol.input, `${owner}: extent tree ${where}: ${problem}`);

/** Checks the header of a tree node; returns its eh_entries and eh_depth. */
function header(buf: Buffer, depth: number | undefined, bad: (problem: string) => InputError): { eh_entries: number; eh_depth: number } {
  const eh_magic = buf.readUInt16LE(0);
  if (eh_magic !== EXT4_EXT_MAGIC) throw bad(`eh_magic is 0x${eh_magic.toString(16)}, expected 0xf30a`);
  const eh_entries = buf.readUInt16LE(2);
  const eh_max = buf.readUInt16LE(4);
  const eh_depth = buf.readUInt16LE(6);
  const room = Math.floor((buf.length - ENTRY) / ENTRY);
  if (eh_max > room) throw bad(`eh_max ${eh_max} exceeds the node's room for ${room} entries`);
  if (eh_entries > eh_max) throw bad(`eh_entries ${eh_entries} exceeds eh_max ${eh_max}`);
  if (depth === undefined ? eh_depth > EXT4_MAX_EXTENT_DEPTH : eh_depth !== depth) {
    throw bad(`eh_depth ${eh_depth} where ${depth ?? `at most ${EXT4_MAX_EXTENT_DEPTH}`} was expected`);
  }
  return { eh_entries, eh_depth };
}

/** The extents of a leaf node (eh_depth 0), checked; `from` is the first logical block they may use. */
function leaf(vol: Volume, buf: Buffer, eh_entries: number, owner: string, where: string, from: number, hi: number): Run[] {
  const bad = badIn(vol, owner, where);
  const runs: Run[] = [];
  let nextLogical = from;
  for (let i = 0; i < eh_entries; i++) {
    const o = ENTRY + i * ENTRY;
    const ee_block = buf.readUInt32LE(o);
    const ee_len = buf.readUInt16LE(o + 4);
    const physical = buf.readUInt16LE(o + 6) * 2 ** 32 + buf.readUInt32LE(o + 8);
    const unwritten = ee_len > EXT_INIT_MAX_LEN;
    const length = unwritten ? ee_len - EXT_INIT_MAX_LEN : ee_len;
    if (length === 0) throw bad(`extent ${i} has ee_len 0`);
    if (ee_block < nextLogical || ee_block + length > hi) {
      throw bad(`extent ${i} (ee_block ${ee_block}, ${length} blocks) overlaps another or lies outside its index range`);
    }
    vol.checkBlocks(physical, length, `${owner} extent ${i} in ${where}`);
    nextLogical = ee_block + length;
    runs.push({ logical: ee_block, physical, length, unwritten });
  }
  return runs;
}


/**
 * The runs of an extent-mapped inode whose whole tree is its root in i_block (eh_depth 0, as for
 * most small files), at once; undefined when the tree has blocks of its own (read extentRuns).
 */
export function rootExtentRuns(vol: Volume, i_block: Buffer, owner: string): Run[] | undefined {
  const bad = badIn(vol, owner, 'root in i_block');
  const { eh_entries, eh_depth } = header(i_block, undefined, bad);
  return eh_depth === 0 ? leaf(vol, i_block, eh_entries, owner, 'root in i_block', 0, EXT_MAX_BLOCKS) : undefined;
}

/**
 * The runs of an extent-mapped inode, in logical order, from the tree rooted in i_block.
 * Every node is checked: magic, entry counts against the node's room, depth decreasing by one per
 * level, each tree block visited once, extents in strictly increasing order inside their parent
 * index's range. So a corrupt tree (a cycle, an index pointing back up, overlapping extents)
 * ends in an InputError after at most one visit per block.
 */
export async function* extentRuns(vol: Volume, i_block: Buffer, owner: string): AsyncGenerator<Run> {
  const visited = new Set<number>();
  let nextLogical = 0;

  async function* node(buf: Buffer, where: string, depth: number | undefined, lo: number, hi: number): AsyncGenerator<Run> {
    const bad = badIn(vol, owner, where);
    const { eh_entries, eh_depth } = header(buf, depth, bad);
    if (eh_depth === 0) {
      const runs = leaf(vol, buf, eh_entries, owner, where, Math.max(nextLogical, lo), hi);
      if (runs.length) nextLogical = runs[runs.length - 1]!.logical + runs[runs.length - 1]!.length;
      yield* runs;
      return;
    }

    for (let i = 0; i < eh_entries; i++) {
      const o = ENTRY + i * ENTRY;
      const ei_block = buf.readUInt32LE(o);
      const leafBlock = buf.readUInt16LE(o + 8) * 2 ** 32 + buf.readUInt32LE(o + 4);
      const next = i + 1 < eh_entries ? buf.readUInt32LE(o + ENTRY) : hi;
      if (ei_block < lo || next <= ei_block || next > hi) {
        throw bad(`index ${i} (ei_block ${ei_block}) is out of order or outside its parent's range`);
      }
      if (visited.has(leafBlock)) throw bad(`index ${i} points to block ${leafBlock}, already part of the tree`);
      visited.add(leafBlock);
      const child = await vol.readBlocks(leafBlock, 1, `${owner} extent tree block`);
      yield* node(child, `block ${leafBlock}`, eh_depth - 1, ei_block, next);
    }
  }

  yield* node(i_block, 'root in i_block', undefined, 0, EXT_MAX_BLOCKS);
}
