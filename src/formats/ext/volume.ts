/** What the mapping, directory and xattr parsers need from the file system: checked block reads. */
export interface Volume {
  /** Name used in error messages (the source's name). */
  readonly input: string;
  readonly blockSize: number;
  /**
   * Throw unless blocks [block, block + count) are valid data blocks: above s_first_data_block
   * and below s_blocks_count, as the kernel's ext4_inode_block_valid requires.
   */
  checkBlocks(block: number, count: number, what: string): void;
  /** Read `count` whole blocks starting at `block`, after checkBlocks. */
  readBlocks(block: number, count: number, what: string): Promise<Buffer>;
}

/** A stretch of a file: `length` logical blocks from `logical` stored from block `physical`. */
export interface Run {
  logical: number;
  physical: number;
  length: number;
  /** An unwritten (preallocated) extent: reads as zeros. */
  unwritten: boolean;
}
