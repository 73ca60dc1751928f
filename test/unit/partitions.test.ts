import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InputError } from '../../src/errors.js';
import { chooseRootPartition, partitionSource, readPartitionTable, type Partition } from '../../src/formats/partitions.js';
import { checkReadRange, FileSource, type Source } from '../../src/formats/source.js';
import { patch, readAt, expectInputError } from '../helpers/bytes.js';

const MiB = 1024 * 1024;
const LINUX_GUID = '0FC63DAF-8483-4772-8E79-3D69D8477DE4';
const SWAP_GUID = '0657FD6D-A4AB-43C4-84E5-0933C84B4F4F';
const EFI_GUID = 'C12A7328-F81F-11D2-BA4B-00A0C93EC93B';
const BIOS_GUID = '21686148-6449-6E6F-744E-656564454649';

class BufferSource implements Source {
  readonly size: number;
  constructor(
    private readonly buf: Buffer,
    readonly name = 'mem.img',
  ) {
    this.size = buf.length;
  }
  async read(position: number, length: number): Promise<Buffer> {
    checkReadRange(this, position, length);
    return Buffer.from(this.buf.subarray(position, position + length));
  }
  async close(): Promise<void> {}
}

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ddk2docker-partitions-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** A sparse disk partitioned by sfdisk from a script. */
async function sfdiskDisk(file: string, size: number, script: string): Promise<string> {
  const path = join(dir, file);
  await writeFile(path, '');
  await truncate(path, size);
  await execa('sfdisk', ['--quiet', '--no-reread', '--no-tell-kernel', path], { input: script });
  return path;
}

interface Comparable {
  index: number;
  offset: number;
  size: number;
  type: string;
  name?: string | undefined;
  bootable: boolean;
}

/** sfdisk's own reading of the table, in our terms. */
async function oracle(path: string): Promise<Comparable[]> {
  const { stdout } = await execa('sfdisk', ['--json', path]);
  const table = JSON.parse(stdout).partitiontable as {
    partitions: { node: string; start: number; size: number; type: string; name?: string; bootable?: boolean }[];
  };
  return table.partitions.map((p) => ({
    index: Number(p.node.slice(path.length)),
    offset: p.start * 512,
    size: p.size * 512,
    type: p.type,
    name: p.name,
    bootable: p.bootable ?? false,
  }));
}

function comparable(parts: Partition[]): Comparable[] {
  return parts.map((p) => ({ index: p.index, offset: p.offset, size: p.size, type: p.type, name: p.name, bootable: p.bootable ?? false }));
}

async function readTable(path: string) {
  const src = await FileSource.open(path, 'disk.raw');
  try {
    return await readPartitionTable(src);
  } finally {
    await src.close();
  }
}

function u32le(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n);
  return b;
}

const MBR_SCRIPT = 'label: dos\nstart=63, size=1985, type=83, bootable\nstart=2048, size=4096, type=82\n';
const EXTENDED_SCRIPT =
  'label: dos\nstart=2048, size=8192, type=83\nstart=10240, type=5\nsize=4096, type=83\nsize=4096, type=82\ntype=83\n';
const GPT_SCRIPT = [
  'label: gpt',
  `size=1MiB, type=${BIOS_GUID}, name=bios`,
  `size=8MiB, type=${EFI_GUID}, name="EFI System"`,
  `size=16MiB, type=${LINUX_GUID}, name=root`,
  `type=${SWAP_GUID}, name=swap`,
  '',
].join('\n');

describe('MBR', () => {
  it('reads primaries at sectors 63 and 2048 as sfdisk does', async () => {
    const path = await sfdiskDisk('mbr.img', 64 * MiB, MBR_SCRIPT);
    const table = await readTable(path);
    expect(table.scheme).toBe('mbr');
    expect(comparable(table.partitions)).toEqual(await oracle(path));
    expect(table.partitions.map((p) => p.typeName)).toEqual(['linux', 'swap']);
    expect(table.partitions[0]).toMatchObject({ offset: 63 * 512, bootable: true });
    expect(table.warnings).toEqual([]);
  });

  it('follows the EBR chain of an extended partition with three logicals', async () => {
    const path = await sfdiskDisk('extended.img', 64 * MiB, EXTENDED_SCRIPT);
    const table = await readTable(path);
    expect(comparable(table.partitions)).toEqual(await oracle(path));
    expect(table.partitions.map((p) => [p.index, p.typeName])).toEqual([
      [1, 'linux'], [2, 'extended'], [5, 'linux'], [6, 'swap'], [7, 'linux'],
    ]);
  });

  it('reports no table (whole disk) when the 0x55AA signature is missing', async () => {
    const path = await sfdiskDisk('nosig.img', 8 * MiB, MBR_SCRIPT);
    await patch(path, 510, Buffer.from([0x55, 0xab]));
    const table = await readTable(path);
    expect(table.scheme).toBe('none');
    expect(table.partitions).toEqual([{ index: 1, offset: 0, size: 8 * MiB, type: 'none', typeName: 'other' }]);
  });

  it('rejects a partition past the end of the disk', async () => {
    const path = await sfdiskDisk('short.img', 64 * MiB, MBR_SCRIPT + 'start=8192, type=83\n');
    await truncate(path, 32 * MiB);
    await expectInputError(readTable(path), /^disk\.raw: partition 3 \(sectors 8192–131071\) extends past the end of the disk \(65536 sectors\)$/);
  });

  it('rejects overlapping partitions', async () => {
    const path = await sfdiskDisk('overlap.img', 64 * MiB, MBR_SCRIPT);
    // Move partition 2 to start inside partition 1.
    await patch(path, 446 + 16 + 8, u32le(1000));
    await expectInputError(readTable(path), /partitions 1 \(sectors 63–2047\) and 2 \(sectors 1000–5095\) overlap/);
  });

  it('rejects overlapping logical partitions', async () => {
    const path = await sfdiskDisk('overlap-logical.img', 64 * MiB, EXTENDED_SCRIPT);
    // Grow logical 5 (sectors 12288–16383) over logical 6, which starts at 18432.
    await patch(path, 10240 * 512 + 446 + 12, u32le(7000));
    await expectInputError(readTable(path), /partitions 5 .* and 6 .* overlap/);
  });

  it('detects an EBR loop', async () => {
    const path = await sfdiskDisk('loop.img', 64 * MiB, EXTENDED_SCRIPT);
    const secondEbr = 10240 + (await readAt(path, 10240 * 512 + 446 + 16 + 8, 4)).readUInt32LE(0);
    // Point the second EBR's link back at the first EBR (relative LBA 0).
    await patch(path, secondEbr * 512 + 446 + 16 + 8, u32le(0));
    await expectInputError(readTable(path), /EBR chain of extended partition 2 loops back to sector 10240/);
  });

  it('rejects an EBR chain that leaves the extended partition', async () => {
    const path = await sfdiskDisk('ebr-out.img', 64 * MiB, EXTENDED_SCRIPT);
    await patch(path, 10240 * 512 + 446 + 16 + 8, u32le(0xfffff000));
    await expectInputError(readTable(path), /an EBR of extended partition 2 lies at sector \d+, outside the partition/);
  });

  it('survives random entries: a table or an InputError, nothing else', async () => {
    for (let i = 0; i < 2000; i++) {
      const disk = Buffer.alloc(64 * 1024);
      const mbr = randomBytes(66);
      mbr.copy(disk, 446);
      for (let e = 0; e < 4; e++) {
        disk[446 + e * 16] = i % 2 ? 0 : 0x80;
        disk.writeUInt32LE(disk.readUInt32LE(446 + e * 16 + 8) % 160, 446 + e * 16 + 8);
        disk.writeUInt32LE(disk.readUInt32LE(446 + e * 16 + 12) % 160, 446 + e * 16 + 12);
        if (e === i % 4) disk[446 + e * 16 + 4] = 0x05;
      }
      disk[510] = 0x55;
      disk[511] = 0xaa;
      // Random EBR-like sectors everywhere else the chain might wander.
      for (let s = 1; s < 128; s++) {
        randomBytes(64).copy(disk, s * 512 + 446);
        for (let e = 0; e < 2; e++) disk.writeUInt32LE(disk.readUInt32LE(s * 512 + 446 + e * 16 + 8) % 128, s * 512 + 446 + e * 16 + 8);
        disk[s * 512 + 446 + 16 + 4] = 0x05;
        disk[s * 512 + 510] = 0x55;
        disk[s * 512 + 511] = 0xaa;
      }
      try {
        const table = await readPartitionTable(new BufferSource(disk));
        for (const p of table.partitions) expect(p.offset + p.size).toBeLessThanOrEqual(disk.length);
      } catch (err) {
        expect(err).toBeInstanceOf(InputError);
      }
    }
  });
});

describe('GPT', () => {
  const size = 64 * MiB;
  const lastLba = size / 512 - 1;

  it('reads a GPT as sfdisk does', async () => {
    const path = await sfdiskDisk('gpt.img', size, GPT_SCRIPT);
    const table = await readTable(path);
    expect(table.scheme).toBe('gpt');
    expect(comparable(table.partitions)).toEqual(await oracle(path));
    expect(table.partitions.map((p) => p.typeName)).toEqual(['bios-boot', 'efi', 'linux', 'swap']);
    expect(table.partitions.map((p) => p.name)).toEqual(['bios', 'EFI System', 'root', 'swap']);
    expect(table.warnings).toEqual([]);
  });

  it('keeps entry numbers when an entry in the middle is unused', async () => {
    const path = await sfdiskDisk('gpt-gap.img', size, GPT_SCRIPT);
    await execa('sfdisk', ['--quiet', '--no-reread', '--no-tell-kernel', '--delete', path, '2']);
    const table = await readTable(path);
    expect(table.partitions.map((p) => p.index)).toEqual([1, 3, 4]);
    expect(comparable(table.partitions)).toEqual(await oracle(path));
  });

  it('falls back to the backup header when the primary header CRC is wrong', async () => {
    const path = await sfdiskDisk('gpt-hcrc.img', size, GPT_SCRIPT);
    const expected = await oracle(path);
    await patch(path, 512 + 16, Buffer.from('dead', 'latin1'));
    const table = await readTable(path);
    expect(comparable(table.partitions)).toEqual(expected);
    expect(table.warnings).toEqual([
      expect.stringMatching(new RegExp(`^primary GPT header at LBA 1 is unusable \\(header CRC32 mismatch .*\\); using the backup header at LBA ${lastLba}$`)),
    ]);
  });

  it('falls back to the backup header when the primary entry array CRC is wrong', async () => {
    const path = await sfdiskDisk('gpt-ecrc.img', size, GPT_SCRIPT);
    const expected = await oracle(path);
    // A letter of partition 1's name in the primary array (LBA 2).
    await patch(path, 2 * 512 + 56, Buffer.from('X\0', 'utf16le').subarray(0, 1));
    const table = await readTable(path);
    expect(comparable(table.partitions)).toEqual(expected);
    expect(table.warnings[0]).toMatch(/partition entry array CRC32 mismatch/);
  });

  it('fails with both reasons when primary and backup are corrupt', async () => {
    const path = await sfdiskDisk('gpt-both.img', size, GPT_SCRIPT);
    await patch(path, 512 + 16, Buffer.from('dead', 'latin1'));
    await patch(path, 2 * 512 + 56, Buffer.from('X', 'latin1'));
    await patch(path, lastLba * 512 + 16, Buffer.from('dead', 'latin1'));
    await expectInputError(
      readTable(path),
      new RegExp(`^disk\\.raw: GPT is corrupt: primary header at LBA 1: header CRC32 mismatch .*; backup header at LBA ${lastLba}: header CRC32 mismatch`),
    );
  });

  it('uses the backup when the primary header is wiped', async () => {
    const path = await sfdiskDisk('gpt-wiped.img', size, GPT_SCRIPT);
    await patch(path, 512, Buffer.alloc(512));
    const table = await readTable(path);
    expect(table.partitions).toHaveLength(4);
    expect(table.warnings[0]).toMatch(/no "EFI PART" signature/);
  });

  /** Rewrites a header field and recomputes the header CRC, so only the field is wrong. */
  async function patchHeader(path: string, lba: number, at: number, value: Buffer): Promise<void> {
    const header = await readAt(path, lba * 512, 92);
    value.copy(header, at);
    header.writeUInt32LE(0, 16);
    header.writeUInt32LE(crc32(header), 16);
    await patch(path, lba * 512, header);
  }

  it('rejects absurd header fields with a consistent CRC', async () => {
    const cases: [number, Buffer, RegExp][] = [
      [80, u32le(0xffffffff), /absurd partition entry array/],
      [84, u32le(100), /invalid Size Of Partition Entry 100/],
      [12, u32le(4096), /invalid Header Size 4096/],
      [72, Buffer.from('ffffffffffffff00', 'hex'), /partition entry array .* lies past the end of the disk/],
      [48, Buffer.from('ffffffff00000000', 'hex'), /usable area .* does not fit/],
      [24, u32le(7), /MyLBA 7 is not its own location/],
    ];
    for (const [i, [at, value, reason]] of cases.entries()) {
      const path = await sfdiskDisk(`gpt-absurd-${i}.img`, size, GPT_SCRIPT);
      await patchHeader(path, 1, at, value);
      await patchHeader(path, lastLba, at, value);
      await expectInputError(readTable(path), reason);
    }
  });

  it('rejects a GPT partition past the end of the disk', async () => {
    const path = await sfdiskDisk('gpt-past.img', size, GPT_SCRIPT);
    await truncate(path, 32 * MiB);
    // The backup header went with the tail; keep a valid primary whose partition 4 now overhangs.
    await patchHeader(path, 1, 48, Buffer.from('ff7f000000000000', 'hex'));
    await expectInputError(readTable(path), /partition 4 \(sectors 53248–129023\) extends past the end of the disk \(65536 sectors\)/);
  });

  it('says 4096-byte-sector GPT is unsupported', async () => {
    const disk = Buffer.alloc(64 * 1024);
    disk[446 + 4] = 0xee;
    disk.writeUInt32LE(1, 446 + 8);
    disk.writeUInt32LE(127, 446 + 12);
    disk[510] = 0x55;
    disk[511] = 0xaa;
    disk.write('EFI PART', 4096, 'latin1');
    await expectInputError(readPartitionTable(new BufferSource(disk)), /4096-byte logical sectors is not supported/);
  });
});

describe('partitionSource', () => {
  it('reads the partition through a slice named after it', async () => {
    const path = await sfdiskDisk('slice.img', 64 * MiB, MBR_SCRIPT);
    const marker = randomBytes(4096);
    await patch(path, 2048 * 512, marker);
    const src = await FileSource.open(path, 'disk.raw');
    const { partitions } = await readPartitionTable(src);
    const part = partitionSource(src, partitions[1]!);
    expect(part.name).toBe('disk.raw partition 2');
    expect(part.size).toBe(4096 * 512);
    expect(await part.read(0, 4096)).toEqual(marker);
    await expect(async () => part.read(part.size - 1, 2)).rejects.toThrow(/^disk\.raw partition 2: read of 2 bytes/);
    await src.close();
  });
});

describe('chooseRootPartition', () => {
  const mbr: Partition[] = [
    { index: 1, offset: 1048576, size: 4 * MiB, type: '83', typeName: 'linux', bootable: true },
    { index: 2, offset: 5 * MiB, size: 59 * MiB, type: '5', typeName: 'extended', bootable: false },
    { index: 5, offset: 6 * MiB, size: 2 * MiB, type: '82', typeName: 'swap', bootable: false },
    { index: 6, offset: 9 * MiB, size: 8 * MiB, type: '83', typeName: 'linux', bootable: false },
    { index: 7, offset: 18 * MiB, size: 8 * MiB, type: '7', typeName: 'other', bootable: false },
  ];

  it('takes the first Linux partition whose probe says yes, probing nothing else', async () => {
    const probed: number[] = [];
    const p = await chooseRootPartition(mbr, async (q) => {
      probed.push(q.index);
      return q.index === 6;
    });
    expect(p.index).toBe(6);
    expect(probed).toEqual([1, 6]);
  });

  it('continues past a probe that fails with an InputError and reports why', async () => {
    const probe = async (q: Partition): Promise<boolean> => {
      throw new InputError(`disk.raw partition ${q.index}`, 'bad ext superblock');
    };
    await expectInputError(
      chooseRootPartition(mbr, probe, 'auto', 'disk.raw'),
      /^disk\.raw: no root file system found: .*\(partition 1: disk\.raw partition 1: bad ext superblock; partition 6: .*\); partitions: 1: linux \(type 83\), 4\.0 MiB at sector 2048; 2: extended .*--partition N$/,
    );
  });

  it('lets other errors through', async () => {
    await expect(chooseRootPartition(mbr, async () => { throw new TypeError('bug'); })).rejects.toThrow(TypeError);
  });

  it('fails listing the partitions when no probe says yes', async () => {
    await expectInputError(chooseRootPartition(mbr, async () => false, 'auto', 'disk.raw'), /no root file system found.*5: swap \(type 82\), 2\.0 MiB at sector 12288/);
    await expectInputError(chooseRootPartition([], async () => true, 'auto', 'disk.raw'), /the partition table is empty/);
  });

  it('honours an override without probing, and refuses extended, swap and missing ones', async () => {
    const never = async (): Promise<boolean> => {
      throw new Error('must not probe');
    };
    expect((await chooseRootPartition(mbr, never, 7)).index).toBe(7);
    await expectInputError(chooseRootPartition(mbr, never, 2, 'disk.raw'), /^disk\.raw: partition 2 is an extended partition, not a file system; partitions: 1: /);
    await expectInputError(chooseRootPartition(mbr, never, 5), /partition 5 is swap, not a file system/);
    await expectInputError(chooseRootPartition(mbr, never, 3), /there is no partition 3; partitions: 1: linux/);
  });

  it('treats a disk without a table as partition 1 when the probe agrees', async () => {
    const raw = new BufferSource(Buffer.alloc(1024 * 1024), 'fs.img');
    const table = await readPartitionTable(raw);
    expect(table.scheme).toBe('none');
    expect((await chooseRootPartition(table.partitions, async () => true)).index).toBe(1);
    expect(partitionSource(raw, table.partitions[0]!).name).toBe('fs.img');
    await expectInputError(chooseRootPartition(table.partitions, async () => false, 'auto', 'fs.img'), /whole disk \(no partition table, 1\.0 MiB\)/);
  });

  it('probes GPT Linux and root types in entry order', async () => {
    const path = await sfdiskDisk('gpt-root.img', 64 * MiB, GPT_SCRIPT.replace(`size=16MiB, type=${LINUX_GUID}`, 'size=16MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709'));
    const { partitions } = await readTable(path);
    const probed: number[] = [];
    const p = await chooseRootPartition(partitions, async (q) => (probed.push(q.index), true));
    expect(p).toMatchObject({ index: 3, typeName: 'linux', name: 'root' });
    expect(probed).toEqual([3]);
  });
});
