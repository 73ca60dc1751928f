import { mkdtemp, open, rm, type FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { GrowingFile } from '../../src/formats/growing.js';
import { SliceSource } from '../../src/formats/source.js';

/**
 * A file read while it is written (the builtin engine's scratch disk): reads wait for their
 * bytes, readSync gives them at once only when they are there, and a failure reaches both.
 */
const REGION = 1 << 20;

let dir: string;
let fh: FileHandle;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ddk2docker-growing-'));
  fh = await open(join(dir, 'disk.img'), 'w+');
  await fh.truncate(3 * REGION);
});

afterEach(async () => {
  await fh.close();
  await rm(dir, { recursive: true, force: true });
});

function bytes(n: number, seed: number): Buffer {
  return Buffer.from(Array.from({ length: n }, (_, i) => (i * 7 + seed) & 0xff));
}

describe('GrowingFile', () => {
  it('a read waits until its bytes are written; readSync gives them only once they are', async () => {
    const file = new GrowingFile(fh, [{ start: 0, length: REGION }, { start: 2 * REGION, length: REGION }], new AbortController().signal);
    const view = file.view('disk.img', 3 * REGION);
    const data = bytes(8192, 1);
    expect(view.readSync!(100, 4000)).toBeUndefined();
    let got: Buffer | undefined;
    const reading = view.read(100, 4000).then((b) => (got = b));
    await fh.write(data, 0, data.length, 0);
    file.advance(0, 4096);
    await new Promise((r) => setTimeout(r, 10));
    expect(got).toBeUndefined();
    file.advance(0, 8192);
    await reading;
    expect(got!.equals(data.subarray(100, 4100))).toBe(true);
    expect(view.readSync!(100, 4000)!.equals(data.subarray(100, 4100))).toBe(true);
    // Bytes outside every region (a left-out chunk) are holes at once; a finished region's unwritten rest too.
    expect(view.readSync!(REGION + 5, 10)!.equals(Buffer.alloc(10))).toBe(true);
    expect(view.readSync!(2 * REGION, 10)).toBeUndefined();
    file.finish(1);
    expect(view.readSync!(2 * REGION, 10)!.equals(Buffer.alloc(10))).toBe(true);
  });

  it('readSync leaves large reads to read', async () => {
    const file = new GrowingFile(fh, [{ start: 0, length: REGION }], new AbortController().signal);
    file.finish(0);
    const view = file.view('disk.img', 3 * REGION);
    expect(view.readSync!(0, 256 * 1024)).toHaveLength(256 * 1024);
    expect(view.readSync!(0, 256 * 1024 + 1)).toBeUndefined();
    expect(await view.read(0, REGION)).toHaveLength(REGION);
  });

  it('a slice passes readSync through, within its own bounds', async () => {
    const file = new GrowingFile(fh, [{ start: 0, length: REGION }], new AbortController().signal);
    const data = bytes(4096, 3);
    await fh.write(data, 0, data.length, 1024);
    file.advance(0, 1024 + 4096);
    const slice = new SliceSource(file.view('disk.img', 3 * REGION), 1024, 4096, 'disk.img partition 1');
    expect(slice.readSync(0, 4096)!.equals(data)).toBe(true);
    expect(() => slice.readSync(4000, 200)).toThrow(/disk\.img partition 1: read of 200 bytes at offset 4000 is outside the 4096-byte image/);
  });

  it('a failure fails waiting and later reads, and readSync no longer answers', async () => {
    const file = new GrowingFile(fh, [{ start: 0, length: REGION }], new AbortController().signal);
    const view = file.view('disk.img', 3 * REGION);
    file.advance(0, 4096);
    const waiting = view.read(0, 8192);
    file.fail(new Error('chunk 0 is corrupt'));
    await expect(waiting).rejects.toThrow('chunk 0 is corrupt');
    await expect(view.read(0, 10)).rejects.toThrow('chunk 0 is corrupt');
    expect(view.readSync!(0, 10)).toBeUndefined();
  });
});
