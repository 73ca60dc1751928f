import { mkdtemp, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InputError } from '../../src/errors.js';
import { FileSource, SYNC_READ_MAX, SliceSource } from '../../src/formats/source.js';

/** A local file as a Source: read and readSync give the same bytes; readSync only small reads. */
let dir: string;
let path: string;
const data = Buffer.from(Array.from({ length: 1 << 20 }, (_, i) => (i * 31 + 7) & 0xff));

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ddk2docker-source-'));
  path = join(dir, 'disk.img');
  await writeFile(path, data);
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('FileSource', () => {
  it('readSync gives what read gives, up to SYNC_READ_MAX bytes, and leaves larger reads to read', async () => {
    const src = await FileSource.open(path, 'disk.img');
    try {
      for (const [position, length] of [[0, 0], [0, 1], [4095, 4097], [123_456, 65_536], [data.length - SYNC_READ_MAX, SYNC_READ_MAX]] as const) {
        const now = src.readSync(position, length);
        expect(now?.equals(data.subarray(position, position + length)), `${position}+${length}`).toBe(true);
        expect((await src.read(position, length)).equals(now!)).toBe(true);
      }
      expect(src.readSync(0, SYNC_READ_MAX + 1)).toBeUndefined();
      // Through a partition's window, too.
      const part = new SliceSource(src, 4096, 8192, 'disk.img partition 1');
      expect(part.readSync(100, 50)?.equals(data.subarray(4196, 4246))).toBe(true);
    } finally {
      await src.close();
    }
  });

  it('a read outside the file, or past an end that moved, is an InputError naming it', async () => {
    const src = await FileSource.open(path, 'disk.img');
    try {
      expect(() => src.readSync(data.length - 10, 11)).toThrow(InputError);
      expect(() => src.readSync(data.length - 10, 11)).toThrow(/^disk\.img: read of 11 bytes at offset 1048566 is outside the 1048576-byte image$/);
      await truncate(path, 1000);
      expect(() => src.readSync(900, 200)).toThrow('disk.img: unexpected end of file at offset 1000');
    } finally {
      await src.close();
      await writeFile(path, data);
    }
  });
});
