import { mkdir, mkdtemp, readFile, rm, stat, truncate, writeFile, open as openFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync, gunzipSync } from 'node:zlib';
import { randomBytes } from 'node:crypto';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Iso9660, type IsoEntry } from '../../src/formats/iso9660.js';
import { FileSource } from '../../src/formats/source.js';
import { expectInputError } from '../helpers/bytes.js';

// bsdtar (libarchive) is the independent oracle for listings and contents.
const UTF8 = { env: { LC_ALL: 'C.UTF-8' } };
const LONG = 'L'.repeat(200);
// Longer than one NM entry can hold (250 bytes): the name is split over continued NM entries.
const LONGEST = 'M'.repeat(255);
const ACCENTED = `${'é'.repeat(40)}.txt`;

let tmp: string;
const isos: Record<string, string> = {};

async function xorriso(name: string, dir: string, args: string[]): Promise<string> {
  const out = join(tmp, `${name}.iso`);
  await execa('xorriso', ['-as', 'mkisofs', ...args, '-V', name.toUpperCase(), '-o', out, dir]);
  isos[name] = out;
  return out;
}

async function withIso<T>(path: string, fn: (iso: Iso9660) => Promise<T>): Promise<T> {
  const src = await FileSource.open(path);
  try {
    return await fn(await Iso9660.open(src));
  } finally {
    await src.close();
  }
}

async function walkAll(iso: Iso9660): Promise<IsoEntry[]> {
  const out: IsoEntry[] = [];
  for await (const e of iso.walk()) out.push(e);
  return out;
}

async function bsdtarList(path: string): Promise<string[]> {
  const { stdout } = await execa('bsdtar', ['-tf', path], UTF8);
  return stdout.split('\n').filter((l) => l !== '' && l !== '.').sort();
}

/** Every path and every file's bytes agree with what bsdtar lists and extracts. */
async function compareWithBsdtar(isoPath: string): Promise<IsoEntry[]> {
  const out = await mkdtemp(join(tmp, 'x-'));
  await execa('bsdtar', ['-xf', isoPath, '-C', out], UTF8);
  return withIso(isoPath, async (iso) => {
    const entries = await walkAll(iso);
    expect(entries.map((e) => e.path).sort()).toEqual(await bsdtarList(isoPath));
    for (const e of entries) {
      const st = await stat(join(out, e.path));
      expect(e.isDirectory, e.path).toBe(st.isDirectory());
      if (e.isDirectory) continue;
      expect(e.size, e.path).toBe(st.size);
      const file = iso.open(e);
      expect((await file.read(0, file.size)).equals(await readFile(join(out, e.path))), e.path).toBe(true);
    }
    await rm(out, { recursive: true });
    return entries;
  });
}

/** A copy of an ISO with bytes changed, for corruption tests. */
async function patched(from: string, name: string, edit: (buf: Buffer) => void): Promise<string> {
  const buf = await readFile(from);
  edit(buf);
  const out = join(tmp, `${name}.iso`);
  await writeFile(out, buf);
  return out;
}

/** Offset of the Directory Record whose File Identifier is `id` (images without Rock Ridge). */
function recordOf(buf: Buffer, id: string): number {
  const needle = Buffer.from(id, 'latin1');
  // Without a System Use field the record length is exact, which random file data rarely fakes.
  const length = 33 + needle.length + (needle.length % 2 === 0 ? 1 : 0);
  for (let i = buf.indexOf(needle); i !== -1; i = buf.indexOf(needle, i + 1)) {
    const start = i - 33;
    if (start >= 0 && buf[start + 32] === needle.length && buf[start] === length && buf[start + 1] === 0) return start;
  }
  throw new Error(`no record ${id}`);
}

function setLocation(buf: Buffer, record: number, block: number): void {
  buf.writeUInt32LE(block, record + 2);
  buf.writeUInt32BE(block, record + 6);
}

beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'iso9660-'));
  const tree = join(tmp, 'tree');
  await mkdir(join(tree, 'deep/a/b/c/d/e/f/g/h/i/j'), { recursive: true });
  await mkdir(join(tree, 'many'));
  await mkdir(join(tree, 'sub'));
  await writeFile(join(tree, 'top.txt'), 'hello\n');
  await writeFile(join(tree, 'noext'), 'no extension');
  await writeFile(join(tree, 'empty'), '');
  await writeFile(join(tree, 'MixedCase.Txt'), 'mixed');
  await writeFile(join(tree, LONG), 'long name');
  await writeFile(join(tree, LONGEST), 'longest name');
  await writeFile(join(tree, 'sub', ACCENTED), 'accents');
  await writeFile(join(tree, 'deep/a/b/c/d/e/f/g/h/i/j/deep.txt'), 'deep');
  await writeFile(join(tree, 'binary.bin'), randomBytes(300_000));
  for (let i = 0; i < 500; i++) await writeFile(join(tree, 'many', `f${String(i).padStart(3, '0')}`), `file ${i}\n`.repeat(i % 7));

  const ddk = join(tmp, 'ddk-tree');
  await mkdir(join(ddk, 'ddk/xvda'), { recursive: true });
  await writeFile(join(ddk, 'ddk/ova.xml'), '<?xml version="1.0" ?>\n<appliance version="0.1"/>\n');
  await writeFile(join(ddk, 'ddk/xvda/chunk-000000000.gz'), gzipSync(Buffer.alloc(100_000, 1)));
  await writeFile(join(ddk, 'ddk/xvda/chunk-000000002.gz'), gzipSync(Buffer.alloc(50_000, 2)));

  // xorrisofs writes Rock Ridge unless told --norock.
  await xorriso('rrj', tree, ['-R', '-J']);
  await xorriso('joliet', tree, ['--norock', '-J']);
  await xorriso('plain1', tree, ['--norock']);
  await xorriso('plain3', tree, ['--norock', '-iso-level', '3']);
  await xorriso('reloc', tree, ['-R', '-rr_reloc_dir', 'rr_moved']);
  await xorriso('ddk', ddk, ['-R', '-J']);
});

afterAll(async () => {
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

describe('Iso9660 against bsdtar', () => {
  it('Rock Ridge + Joliet: Rock Ridge names, long and UTF-8 ones included', async () => {
    const entries = await compareWithBsdtar(isos.rrj!);
    expect(entries.some((e) => e.name === LONG)).toBe(true);
    await withIso(isos.rrj!, async (iso) => {
      expect(iso.nameSource).toBe('rockridge');
      expect(iso.volumeId).toBe('RRJ');
      expect(iso.blockSize).toBe(2048);
      expect((await iso.lookup(`sub/${ACCENTED}`))?.size).toBe(7);
      expect((await iso.lookup(LONG))?.nameSource).toBe('rockridge');
      expect((await iso.lookup(LONGEST))?.size).toBe(12);
      const top = await iso.lookup('/top.txt');
      expect(top?.mode).toBe(0o100644);
      expect((await iso.lookup('deep'))!.mode! & 0o170000).toBe(0o040000);
      // Rock Ridge names are exact.
      expect(await iso.lookup('mixedcase.txt')).toBeUndefined();
      expect((await iso.lookup('MixedCase.Txt'))?.size).toBe(5);
      expect(await iso.lookup('top.txt/x')).toBeUndefined();
      expect(await iso.lookup('missing')).toBeUndefined();
      expect((await iso.lookup(''))?.isDirectory).toBe(true);
    });
  });

  it('a 500-file directory spanning many sectors', async () => {
    await withIso(isos.rrj!, async (iso) => {
      const many = await iso.lookup('many');
      expect(many!.size).toBeGreaterThan(10 * 2048);
      const names = (await iso.list('many')).map((e) => e.name).sort();
      expect(names).toEqual(Array.from({ length: 500 }, (_, i) => `f${String(i).padStart(3, '0')}`));
      const f123 = await iso.lookup('many/f123');
      expect((await iso.open(f123!).read(0, f123!.size)).toString()).toBe('file 123\n'.repeat(123 % 7));
    });
    await withIso(isos.plain1!, async (iso) => expect(await iso.list('MANY')).toHaveLength(500));
  });

  it('Joliet only: UCS-2 names, truncated to 64 characters like bsdtar shows them', async () => {
    const entries = await compareWithBsdtar(isos.joliet!);
    expect(entries.some((e) => e.name === 'L'.repeat(64))).toBe(true);
    await withIso(isos.joliet!, async (iso) => {
      expect(iso.nameSource).toBe('joliet');
      expect((await iso.lookup(`sub/${ACCENTED}`))?.nameSource).toBe('joliet');
      expect(await iso.lookup('mixedcase.txt')).toBeUndefined();
    });
  });

  it.each(['plain1', 'plain3'])('plain ISO 9660 (%s): ";1" and trailing "." stripped, case-insensitive lookup', async (name) => {
    const entries = await compareWithBsdtar(isos[name]!);
    await withIso(isos[name]!, async (iso) => {
      expect(iso.nameSource).toBe('iso9660');
      expect(entries.every((e) => !e.name.includes(';') && !e.name.endsWith('.'))).toBe(true);
      expect(entries.some((e) => e.name === 'NOEXT')).toBe(true);
      expect((await iso.lookup('top.txt'))?.name).toBe('TOP.TXT');
      expect((await iso.lookup('deep/a/b/c/d/e/f/g/h/i/j/deep.txt'))?.size).toBe(4);
    });
  });

  it('deep directories relocated to rr_moved appear at their Rock Ridge place (CL/RE)', async () => {
    const raw = await readFile(isos.reloc!);
    expect(raw.includes(Buffer.from('RR_MOVED'))).toBe(true);
    const entries = await compareWithBsdtar(isos.reloc!);
    expect(entries.some((e) => e.path === 'deep/a/b/c/d/e/f/g/h/i/j/deep.txt')).toBe(true);
    expect(entries.some((e) => e.name.toLowerCase() === 'rr_moved')).toBe(false);
  });

  it('the DDK layout', async () => {
    await compareWithBsdtar(isos.ddk!);
    await withIso(isos.ddk!, async (iso) => {
      expect((await iso.list('ddk/xvda')).map((e) => e.name).sort()).toEqual(['chunk-000000000.gz', 'chunk-000000002.gz']);
      const chunk = await iso.lookup('ddk/xvda/chunk-000000002.gz');
      const file = iso.open(chunk!);
      expect(gunzipSync(await file.read(0, file.size)).equals(Buffer.alloc(50_000, 2))).toBe(true);
      expect(file.name).toBe(`${isos.ddk}:ddk/xvda/chunk-000000002.gz`);
      await expectInputError(file.read(file.size - 1, 2), /outside/);
      await expectInputError(iso.list('ddk/ova.xml'), /not a directory/);
      await expectInputError(iso.list('nope'), /no such directory/);
    });
  });
});

describe('Iso9660 multi-extent files', () => {
  const EXTENT = 0xfffff800; // the largest whole-block extent below 4 GiB, as libisofs cuts them
  const SIZE = 4_500_000_000;
  const marks: [number, string][] = [
    [0, 'START'],
    [EXTENT - 3, 'ACROSS-THE-EXTENTS'],
    [EXTENT + 1_000_000, 'SECOND'],
    [SIZE - 3, 'END'],
  ];

  it('a sparse file over 4 GiB reads as its extents concatenated', async () => {
    const dir = join(tmp, 'big');
    await mkdir(dir);
    const huge = join(dir, 'huge.bin');
    await writeFile(huge, '');
    await truncate(huge, SIZE);
    const fh = await openFile(huge, 'r+');
    for (const [at, text] of marks) await fh.write(Buffer.from(text), 0, text.length, at);
    await fh.close();
    // dd conv=sparse keeps the 4.5 GB image as holes, so only a few megabytes hit the disk; a
    // FIFO between the two keeps the bytes out of this process.
    const iso = join(tmp, 'big.iso');
    const fifo = join(tmp, 'big.fifo');
    await execa('mkfifo', [fifo]);
    const dd = execa('dd', [`if=${fifo}`, `of=${iso}`, 'bs=1M', 'iflag=fullblock', 'conv=sparse', 'status=none']);
    try {
      await execa('xorriso', ['-as', 'mkisofs', '-R', '-iso-level', '3', '-o', fifo, dir]);
    } catch (err) {
      dd.kill();
      throw err;
    }
    await dd;
    expect((await stat(iso)).blocks * 512).toBeLessThan(64 << 20);
    try {
      expect(await bsdtarList(iso)).toEqual(['huge.bin']);
      await withIso(iso, async (image) => {
        const entry = (await image.lookup('huge.bin'))!;
        expect(entry.size).toBe(SIZE);
        expect(entry.extents.length).toBe(2);
        expect(entry.extents[0]!.length).toBe(EXTENT);
        const file = image.open(entry);
        const orig = await FileSource.open(huge);
        for (const [at, text] of marks) {
          const got = await file.read(at, text.length);
          expect(got.toString()).toBe(text);
          expect(got.equals(await orig.read(at, text.length))).toBe(true);
        }
        // A read spanning the boundary and holes on both sides matches the original too.
        const span = await file.read(EXTENT - 100_000, 200_000);
        expect(span.equals(await orig.read(EXTENT - 100_000, 200_000))).toBe(true);
        await orig.close();
      });
    } finally {
      await rm(iso);
      await rm(dir, { recursive: true });
    }
  });
});

describe('Iso9660 bad input', () => {
  it('rejects a file that is not an ISO', async () => {
    const random = join(tmp, 'random.bin');
    await writeFile(random, randomBytes(1 << 20));
    await expectInputError(withIso(random, async () => undefined), /random\.bin: not an ISO 9660 image \(no CD001 volume descriptor\)/);
    const tiny = join(tmp, 'tiny.bin');
    await writeFile(tiny, 'tiny');
    await expectInputError(withIso(tiny, async () => undefined), /not an ISO 9660 image/);
  });

  it('rejects a truncated ISO', async () => {
    const cut = join(tmp, 'cut.iso');
    await writeFile(cut, (await readFile(isos.rrj!)).subarray(0, 200 * 2048));
    await expectInputError(withIso(cut, async () => undefined), /cut\.iso: truncated: the Volume Space Size/);
    const head = join(tmp, 'head.iso');
    await writeFile(head, (await readFile(isos.rrj!)).subarray(0, 17 * 2048));
    await expectInputError(withIso(head, async () => undefined), /Volume Descriptor Set Terminator|truncated/);
  });

  it('rejects a Location of Extent or Data Length beyond the end', async () => {
    const far = await patched(isos.plain1!, 'far', (buf) => setLocation(buf, recordOf(buf, 'TOP.TXT;1'), 0x7fffffff));
    await expectInputError(withIso(far, (iso) => iso.list('')), /"TOP\.TXT": Location of Extent .* beyond the end/);
    const long = await patched(isos.plain1!, 'long', (buf) => {
      const rec = recordOf(buf, 'MANY');
      buf.writeUInt32LE(0xfffff000, rec + 10);
      buf.writeUInt32BE(0xfffff000, rec + 14);
    });
    await expectInputError(withIso(long, (iso) => iso.lookup('many/f001')), /"MANY": .*beyond the end/);
  });

  it('rejects a Length of Directory Record of 0 in the middle of a sector', async () => {
    const zero = await patched(isos.plain1!, 'zero', (buf) => {
      buf[recordOf(buf, 'F100.;1')] = 0;
    });
    await expectInputError(withIso(zero, (iso) => iso.list('many')), /Length of Directory Record is 0 at offset \d+ but the rest/);
    const short = await patched(isos.plain1!, 'short', (buf) => {
      buf[recordOf(buf, 'F200.;1')] = 20;
    });
    await expectInputError(withIso(short, (iso) => iso.list('many')), /Length of Directory Record 20/);
  });

  it('rejects a directory that points to itself or an ancestor, without hanging', async () => {
    const self = await patched(isos.plain1!, 'self', (buf) => {
      const root = buf.readUInt32LE(16 * 2048 + 156 + 2);
      setLocation(buf, recordOf(buf, 'MANY'), root);
    });
    await expectInputError(withIso(self, (iso) => iso.lookup('many/x')), /directory loop/);
    await expectInputError(withIso(self, walkAll), /reached twice/);
    const up = await patched(isos.plain1!, 'up', (buf) => {
      const deep = buf.readUInt32LE(recordOf(buf, 'DEEP') + 2);
      setLocation(buf, recordOf(buf, 'J'), deep);
    });
    await expectInputError(withIso(up, (iso) => iso.lookup('deep/a/b/c/d/e/f/g/h/i/j/k')), /directory loop/);
    await expectInputError(withIso(up, walkAll), /reached twice/);
  });

  it('rejects a System Use continuation (CE) chain that loops', async () => {
    const loop = await patched(isos.rrj!, 'celoop', (buf) => {
      // Point the first CE of a root entry back at the System Use field holding it.
      const root = buf.readUInt32LE(16 * 2048 + 156 + 2) * 2048;
      for (let rec = root; buf[rec]! > 0; rec += buf[rec]!) {
        const lenFi = buf[rec + 32]!;
        const su = rec + 33 + lenFi + (lenFi % 2 === 0 ? 1 : 0);
        const ce = buf.subarray(su, rec + buf[rec]!).indexOf(Buffer.from([0x43, 0x45, 28, 1]));
        if (lenFi <= 1 || ce === -1) continue;
        const at = su + ce;
        for (const [field, value] of [[4, Math.floor(su / 2048)], [12, su % 2048], [20, rec + buf[rec]! - su]] as const) {
          buf.writeUInt32LE(value, at + field);
          buf.writeUInt32BE(value, at + field + 4);
        }
        return;
      }
      throw new Error('no CE entry in the root directory');
    });
    await expectInputError(withIso(loop, (iso) => iso.list('')), /continuation areas/);
  });
});
