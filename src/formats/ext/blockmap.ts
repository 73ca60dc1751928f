import type { Run, Volume } from './volume.js';

const EXT4_NDIR_BLOCKS = 12;
/** Cap on a merged run so a reader's request sizes stay bounded. */
const MAX_RUN = 65536;

/** Merges a file's (logical, physical) block pairs, in logical order, into runs of contiguous blocks. */
class Runs {
  private cur: Run | undefined;
  constructor(private readonly vol: Volume) {}

  /** Returns the finished run when (logical, physical) does not extend the current one. */
  add(logical: number, physical: number, what: string): Run | undefined {
    this.vol.checkBlocks(physical, 1, what);
    const cur = this.cur;
    if (cur && logical === cur.logical + cur.length && physical === cur.physical + cur.length && cur.length < MAX_RUN) {
      cur.length++;
      return undefined;
    }
    this.cur = { logical, physical, length: 1, unwritten: false };
    return cur;
  }

  /** The run still open at the end. */
  last(): Run | undefined {
    return this.cur;
  }

  /** The runs of the 12 direct pointers in i_block (those below `blockCount`). */
  direct(i_block: Buffer, blockCount: number, owner: string): Run[] {
    const done: Run[] = [];
    for (let i = 0; i < EXT4_NDIR_BLOCKS && i < blockCount; i++) {
      const p = i_block.readUInt32LE(i * 4);
      if (p === 0) continue;
      const run = this.add(i, p, `${owner} block ${i}`);
      if (run) done.push(run);
    }
    return done;
  }
}

/**
 * The runs of a block-mapped inode whose blocks all have direct pointers (at most 12 blocks, as
 * for most small files), at once; undefined when it needs indirect blocks (read blockMapRuns).
 */
export function directRuns(vol: Volume, i_block: Buffer, blockCount: number, owner: string): Run[] | undefined {
  if (blockCount > EXT4_NDIR_BLOCKS) return undefined;
  const runs = new Runs(vol);
  const done = runs.direct(i_block, blockCount, owner);
  const last = runs.last();
  return last ? [...done, last] : done;
}

/**
 * The runs of a block-mapped (ext2/ext3 style) inode: 12 direct pointers in i_block, then a
 * single, a double and a triple indirect block. Only logical blocks below `blockCount` are
 * visited, zero pointers are holes (a zero indirect pointer skips its whole subtree), and
 * physically contiguous blocks are merged into one run.
 */
export async function* blockMapRuns(vol: Volume, i_block: Buffer, blockCount: number, owner: string): AsyncGenerator<Run> {
  const perBlock = vol.blockSize / 4;
  const runs = new Runs(vol);

  async function* indirect(ptr: number, level: number, base: number): AsyncGenerator<Run> {
    const span = perBlock ** (level - 1);
    const table = await vol.readBlocks(ptr, 1, `${owner} level-${level} indirect block`);
    for (let j = 0; j < perBlock; j++) {
      const logical = base + j * span;
      if (logical >= blockCount) return;
      const p = table.readUInt32LE(j * 4);
      if (p === 0) continue;
      if (level === 1) {
        const done = runs.add(logical, p, `${owner} block ${logical}`);
        if (done) yield done;
      } else {
        yield* indirect(p, level - 1, logical);
      }
    }
  }

  yield* runs.direct(i_block, blockCount, owner);
  let base = EXT4_NDIR_BLOCKS;
  for (let level = 1; level <= 3 && base < blockCount; level++) {
    const p = i_block.readUInt32LE((EXT4_NDIR_BLOCKS + level - 1) * 4);
    if (p !== 0) yield* indirect(p, level, base);
    base += perBlock ** level;
  }
  const last = runs.last();
  if (last) yield last;
}
