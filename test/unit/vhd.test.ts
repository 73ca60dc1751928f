import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { copyFile, mkdtemp, open, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InputError } from '../../src/errors.js';
import { FileSource, type Source } from '../../src/formats/source.js';
import { detectVhd, openVhd, vhdInfo, type ByteRange, type VhdSource } from '../../src/formats/vhd.js';
import { patch, readAt, expectInputError } from '../helpers/bytes.js';

const MiB = 1024 * 1024;
const RAW_SIZE = 300 * MiB;
const BLOCK = 2 * MiB;
/** Random data at awkward places: sector 0, across a block boundary, unaligned, many blocks, the end. */
const DATA: ByteRange[] = [
  { offset: 0, length: 64 * 1024 },
  { offset: 2 * MiB - 3000, length: 8000 },
  { offset: 100 * MiB + 3, length: MiB },
  { offset: 150 * MiB, length: 5 * MiB },
  { offset: RAW_SIZE - 4096, length: 4096 },
];

let dir: string;
let raw: string;
let dynamic: string;
let fixed: string;
let small: string;
let smallFixed: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ddk2docker-vhd-'));
  raw = join(dir, 'disk.raw');
  await writeFile(raw, '');
  await truncate(raw, RAW_SIZE);
  const fh = await open(raw, 'r+');
  for (const r of DATA) await fh.write(randomBytes(r.length), 0, r.length, r.offset);
  await fh.close();
  dynamic = join(dir, 'dynamic.vhd');
  fixed = join(dir, 'fixed.vhd');
  await execa('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', '-o', 'subformat=dynamic,force_size=on', raw, dynamic]);
  await execa('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', '-o', 'subformat=fixed,force_size=on', raw, fixed]);
  // Small images for the corruption tests, which patch copies.
  const smallRaw = join(dir, 'small.raw');
  await writeFile(smallRaw, randomBytes(6 * MiB));
  small = join(dir, 'small.vhd');
  smallFixed = join(dir, 'small-fixed.vhd');
  await execa('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', '-o', 'subformat=dynamic,force_size=on', smallRaw, small]);
  await execa('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', '-o', 'subformat=fixed,force_size=on', smallRaw, smallFixed]);
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function withSource<T>(path: string, fn: (src: Source) => Promise<T>): Promise<T> {
  const src = await FileSource.open(path, 'disk.vhd');
  try {
    return await fn(src);
  } finally {
    await src.close();
  }
}

async function hashFile(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

async function hashSource(src: Source, upTo = src.size): Promise<string> {
  const hash = createHash('sha256');
  for (let pos = 0; pos < upTo; pos += MiB) hash.update(await src.read(pos, Math.min(MiB, upTo - pos)));
  return hash.digest('hex');
}

async function collect(ranges: AsyncIterable<ByteRange>): Promise<ByteRange[]> {
  const out: ByteRange[] = [];
  for await (const r of ranges) out.push(r);
  return out;
}

/** Rewrites a structure's field and its VHD checksum, so only the field is wrong. */
async function patchStruct(path: string, at: number, size: number, checksumAt: number, field: number, value: Buffer): Promise<void> {
  const buf = await readAt(path, at, size);
  value.copy(buf, field);
  buf.writeUInt32BE(0, checksumAt);
  let sum = 0;
  for (const b of buf) sum += b;
  buf.writeUInt32BE(~sum >>> 0, checksumAt);
  await patch(path, at, buf);
}

function u32be(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}

/** Footer locations and the dynamic header/BAT offsets of a dynamic VHD file. */
async function dynamicLayout(path: string): Promise<{ size: number; headerAt: number; tableAt: number }> {
  const { size } = await stat(path);
  const footer = await readAt(path, size - 512, 512);
  const headerAt = Number(footer.readBigUInt64BE(16));
  const header = await readAt(path, headerAt, 1024);
  return { size, headerAt, tableAt: Number(header.readBigUInt64BE(16)) };
}

async function copy(from: string, name: string): Promise<string> {
  const to = join(dir, name);
  await copyFile(from, to);
  return to;
}

describe.each([
  ['dynamic', () => dynamic],
  ['fixed', () => fixed],
])('%s VHD from qemu-img', (kind, path) => {
  it('detects it, and not the raw disk', async () => {
    expect(await withSource(path(), detectVhd)).toBe(true);
    expect(await withSource(raw, detectVhd)).toBe(false);
  });

  it('reads the virtual disk byte for byte like the raw image', async () => {
    const expected = await hashFile(raw);
    await withSource(path(), async (src) => {
      const vhd = await openVhd(src);
      expect(vhd.size).toBe(RAW_SIZE);
      expect(vhd.name).toBe('disk.vhd (virtual disk)');
      expect(await hashSource(vhd)).toBe(expected);
    });
  });

  it('answers random reads across blocks, holes and edges like the raw image', async () => {
    const rawSrc = await FileSource.open(raw);
    await withSource(path(), async (src) => {
      const vhd = await openVhd(src);
      const probes: [number, number][] = [
        [BLOCK - 1, 2], [BLOCK - 3000, 8000], [0, 3 * BLOCK], [RAW_SIZE - 1, 1], [RAW_SIZE - 5 * MiB, 5 * MiB],
        [149 * MiB + 7, 7 * MiB], [200 * MiB, 4 * BLOCK], [0, 0], [RAW_SIZE, 0],
      ];
      for (let i = 0; i < 300; i++) {
        const near = DATA[i % DATA.length]!.offset;
        const position = Math.max(0, Math.min(RAW_SIZE - 1, near + Math.floor((Math.random() - 0.5) * 6 * MiB)));
        probes.push([position, Math.min(RAW_SIZE - position, Math.floor(Math.random() * 5 * MiB))]);
      }
      for (const [position, length] of probes) {
        const got = await vhd.read(position, length);
        expect(got.length).toBe(length);
        expect(got.equals(await rawSrc.read(position, length)), `read ${length} at ${position}`).toBe(true);
      }
      await expectInputError(vhd.read(RAW_SIZE - 1, 2), /^disk\.vhd \(virtual disk\): read of 2 bytes at offset 314572799 is outside/);
      await expectInputError(vhd.read(-1, 1), /outside/);
    });
    await rawSrc.close();
  });

  it('answers concurrent reads on a fresh source correctly', async () => {
    const rawSrc = await FileSource.open(raw);
    await withSource(path(), async (src) => {
      const vhd = await openVhd(src);
      const positions = Array.from({ length: 64 }, (_, i) => DATA[i % DATA.length]!.offset + (i % 7) * 4099);
      const got = await Promise.all(positions.map((p) => vhd.read(Math.min(p, RAW_SIZE - 70_000), 70_000)));
      for (const [i, p] of positions.entries()) {
        expect(got[i]!.equals(await rawSrc.read(Math.min(p, RAW_SIZE - 70_000), 70_000))).toBe(true);
      }
    });
    await rawSrc.close();
  });

  it('reports its metadata and the ranges that may hold data', async () => {
    await withSource(path(), async (src) => {
      const info = await vhdInfo(src);
      const ranges = await collect((await openVhd(src)).allocatedRanges());
      if (kind === 'fixed') {
        expect(info).toEqual({ diskType: 'fixed', currentSize: RAW_SIZE, warnings: [] });
        expect(ranges).toEqual([{ offset: 0, length: RAW_SIZE }]);
        return;
      }
      // qemu-img leaves all-zero blocks out: 0–1, 50, 75–77 and 149 hold the data.
      expect(info).toEqual({ diskType: 'dynamic', currentSize: RAW_SIZE, blockSize: BLOCK, allocatedBlocks: 7, warnings: [] });
      expect(ranges).toEqual([
        { offset: 0, length: 2 * BLOCK },
        { offset: 50 * BLOCK, length: BLOCK },
        { offset: 75 * BLOCK, length: 3 * BLOCK },
        { offset: 149 * BLOCK, length: BLOCK },
      ]);
      for (const d of DATA) {
        expect(ranges.some((r) => r.offset <= d.offset && d.offset + d.length <= r.offset + r.length)).toBe(true);
      }
    });
  });
});

describe('dynamic VHD details', () => {
  it('uses the footer Current Size of a CHS-rounded image, as qemu-img does', async () => {
    const chs = join(dir, 'chs.vhd');
    await execa('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', raw, chs]);
    const { stdout } = await execa('qemu-img', ['info', '--output=json', chs]);
    const virtualSize = (JSON.parse(stdout) as { 'virtual-size': number })['virtual-size'];
    await withSource(chs, async (src) => {
      const vhd = await openVhd(src);
      expect(vhd.size).toBe(virtualSize);
      expect(vhd.size).toBeGreaterThan(RAW_SIZE);
      expect(await hashSource(vhd, RAW_SIZE)).toBe(await hashFile(raw));
      expect((await vhd.read(RAW_SIZE, vhd.size - RAW_SIZE)).every((b) => b === 0)).toBe(true);
    });
    await rm(chs);
  });

  it('reads an empty image as zeros with no allocated ranges', async () => {
    const empty = join(dir, 'empty.vhd');
    await execa('qemu-img', ['create', '-q', '-f', 'vpc', empty, '100M']);
    await withSource(empty, async (src) => {
      const vhd = await openVhd(src);
      expect(vhd.info).toMatchObject({ diskType: 'dynamic', allocatedBlocks: 0 });
      expect(await collect(vhd.allocatedRanges())).toEqual([]);
      for (let pos = 0; pos < vhd.size; pos += 8 * MiB) {
        expect((await vhd.read(pos, Math.min(8 * MiB, vhd.size - pos))).every((b) => b === 0)).toBe(true);
      }
    });
  });

  it('reads sectors whose bitmap bit is clear as zeros', async () => {
    const path = await copy(small, 'bitmap.vhd');
    const { tableAt } = await dynamicLayout(path);
    const bitmapAt = (await readAt(path, tableAt, 4)).readUInt32BE(0) * 512;
    // Clear sector 1 (bit 6 of byte 0) and sectors 8–15 (byte 1) of block 0.
    await patch(path, bitmapAt, Buffer.from([0xbf, 0x00]));
    const smallRaw = await FileSource.open(join(dir, 'small.raw'));
    const expected = await smallRaw.read(0, 64 * 1024);
    expected.fill(0, 512, 1024);
    expected.fill(0, 8 * 512, 16 * 512);
    await withSource(path, async (src) => {
      const vhd = await openVhd(src);
      expect((await vhd.read(0, 64 * 1024)).equals(expected)).toBe(true);
      expect((await vhd.read(700, 100)).every((b) => b === 0)).toBe(true);
      expect((await vhd.read(1000, 4000)).equals(expected.subarray(1000, 5000))).toBe(true);
      // Block 1 is untouched and the read spans into it.
      expect((await vhd.read(BLOCK - 512, 1024)).equals(await smallRaw.read(BLOCK - 512, 1024))).toBe(true);
    });
    await smallRaw.close();
  });

  it('accepts the 511-byte footer of old images', async () => {
    const path = await copy(smallFixed, 'old-footer.vhd');
    await truncate(path, (await stat(path)).size - 1);
    await withSource(path, async (src) => {
      expect(await detectVhd(src)).toBe(true);
      const vhd = await openVhd(src);
      expect(vhd.size).toBe(6 * MiB);
      expect(await hashSource(vhd)).toBe(await hashFile(join(dir, 'small.raw')));
    });
  });

  it('falls back to the footer copy at offset 0 when the trailing footer is lost', async () => {
    const path = await copy(small, 'no-footer.vhd');
    await truncate(path, (await stat(path)).size - 512);
    await withSource(path, async (src) => {
      expect(await detectVhd(src)).toBe(true);
      const vhd = await openVhd(src);
      expect(vhd.info.warnings).toEqual(['no VHD footer at the end of the file (truncated?); using the footer copy at offset 0']);
      expect(await hashSource(vhd)).toBe(await hashFile(join(dir, 'small.raw')));
    });
  });
});

describe('corrupt VHDs', () => {
  const openFile = (path: string): Promise<VhdSource> => withSource(path, openVhd);

  it('rejects a fixed VHD footer with a wrong checksum', async () => {
    const path = await copy(smallFixed, 'bad-fixed-footer.vhd');
    const { size } = await stat(path);
    await patch(path, size - 512 + 70, Buffer.from([0x42]));
    await expectInputError(openFile(path), /^disk\.vhd: VHD footer checksum mismatch \(footer at offset 6291456: stored 0x[0-9a-f]{8}, computed 0x[0-9a-f]{8}\)$/);
  });

  it('uses the dynamic footer copy when only the trailing footer is corrupt, and fails when both are', async () => {
    const path = await copy(small, 'bad-dynamic-footer.vhd');
    const { size } = await stat(path);
    await patch(path, size - 512 + 70, Buffer.from([0x42]));
    await withSource(path, async (src) => {
      const vhd = await openVhd(src);
      expect(vhd.info.warnings[0]).toMatch(/^VHD footer checksum mismatch .*; using the footer copy at offset 0$/);
      expect(await hashSource(vhd)).toBe(await hashFile(join(dir, 'small.raw')));
    });
    await patch(path, 70, Buffer.from([0x42]));
    await expectInputError(openFile(path), /VHD footer checksum mismatch \(footer at offset \d+: /);
  });

  it('rejects a dynamic disk header with a wrong checksum', async () => {
    const path = await copy(small, 'bad-header.vhd');
    const { headerAt } = await dynamicLayout(path);
    await patch(path, headerAt + 800, Buffer.from([0x42]));
    await expectInputError(openFile(path), /^disk\.vhd: VHD dynamic disk header checksum mismatch \(stored 0x[0-9a-f]+, computed 0x[0-9a-f]+\)$/);
  });

  it('rejects a BAT entry pointing past the end of the file', async () => {
    const path = await copy(small, 'bad-bat.vhd');
    const { tableAt } = await dynamicLayout(path);
    await patch(path, tableAt + 4, u32be(0x00ffffff));
    await expectInputError(openFile(path), /^disk\.vhd: VHD Block Allocation Table entry 1 points to sector 16777215, past the end of the \d+-byte file$/);
  });

  it('refuses differencing disks', async () => {
    const path = await copy(small, 'differencing.vhd');
    const { size } = await stat(path);
    await patchStruct(path, size - 512, 512, 64, 60, u32be(4));
    await patchStruct(path, 0, 512, 64, 60, u32be(4));
    await expectInputError(openFile(path), /differencing VHD \(Disk Type 4\) is not supported: its data depends on a parent image/);
  });

  it('rejects absurd header and footer values', async () => {
    const headerCases: [number, Buffer, RegExp][] = [
      [32, u32be(3), /invalid VHD Block Size 3/],
      [32, u32be(0x80000000), /invalid VHD Block Size 2147483648/],
      [28, u32be(1), /VHD Max Table Entries 1 is too small/],
      [16, Buffer.from('7fffffffffff0000', 'hex'), /VHD Block Allocation Table \(Table Offset \d+, 3 entries\) lies past the end/],
      [0, Buffer.from('cxspars!', 'latin1'), /no dynamic disk header \(cookie "cxsparse"\)/],
      [24, u32be(0x00020000), /unsupported VHD dynamic disk Header Version 0x00020000/],
    ];
    for (const [i, [field, value, reason]] of headerCases.entries()) {
      const path = await copy(small, `absurd-header-${i}.vhd`);
      const { headerAt } = await dynamicLayout(path);
      await patchStruct(path, headerAt, 1024, 36, field, value);
      await expectInputError(openFile(path), reason);
    }
    const footerCases: [number, Buffer, RegExp][] = [
      [48, Buffer.from('1000000000000000', 'hex'), /absurd VHD Current Size 1152921504606846976/],
      [48, Buffer.from('0004000000000000', 'hex'), /VHD Max Table Entries 3 is too small for Current Size 1125899906842624/],
      [16, Buffer.from('00000000ffffff00', 'hex'), /VHD Data Offset 4294967040 points past the end/],
      [60, u32be(9), /unknown VHD Disk Type 9/],
    ];
    for (const [i, [field, value, reason]] of footerCases.entries()) {
      const path = await copy(small, `absurd-footer-${i}.vhd`);
      const { size } = await stat(path);
      // Both footers, or the reader would rightly fall back to the copy at offset 0.
      await patchStruct(path, size - 512, 512, 64, field, value);
      await patchStruct(path, 0, 512, 64, field, value);
      await expectInputError(openFile(path), reason);
    }
    const path = await copy(smallFixed, 'absurd-fixed.vhd');
    const { size } = await stat(path);
    await patchStruct(path, size - 512, 512, 64, 48, Buffer.from('0000000100000000', 'hex'));
    await expectInputError(openFile(path), /fixed VHD Current Size 4294967296 exceeds the 6291456 bytes of data before the footer/);
  });

  it('opens or fails with an InputError whatever the header and BAT say', async () => {
    const base = await copy(small, 'fuzz.vhd');
    const { headerAt, tableAt } = await dynamicLayout(base);
    const header = await readAt(base, headerAt, 1024);
    const bat = await readAt(base, tableAt, 12);
    for (let i = 0; i < 300; i++) {
      await patch(base, headerAt, header);
      await patch(base, tableAt, bat);
      const field = [16, 20, 28, 32][i % 4]!;
      await patchStruct(base, headerAt, 1024, 36, field + (i % 3), randomBytes(1 + (i % 4)));
      if (i % 5 === 0) await patch(base, tableAt + 4 * (i % 3), randomBytes(4));
      try {
        await withSource(base, async (src) => {
          const vhd = await openVhd(src);
          await vhd.read(0, vhd.size);
        });
      } catch (err) {
        expect(err).toBeInstanceOf(InputError);
      }
    }
  });

  it('rejects files that are not VHDs', async () => {
    const tiny = join(dir, 'tiny.bin');
    await writeFile(tiny, 'conectix');
    expect(await withSource(tiny, detectVhd)).toBe(false);
    await expectInputError(openFile(tiny), /not a VHD: no footer cookie "conectix"/);
    await expectInputError(openFile(raw), /^disk\.vhd: not a VHD/);
  });
});
