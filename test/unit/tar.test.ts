import { createReadStream } from 'node:fs';
import { link, lstat, mkdir, readdir, readlink, rm, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { PassThrough, type Readable } from 'node:stream';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CancelledError, InputError } from '../../src/errors.js';
import {
  decodePaxRecords, encodePaxRecords, normalizeTarPath, packTree, readTar, type TarHeader, type TreeEntry,
} from '../../src/formats/tar.js';
import { HOST_TAR_ARGS, gnuTar, makeTemp, pattern } from '../helpers/extfixtures.js';

let tmp: string;
beforeAll(async () => {
  tmp = await makeTemp('tar-test-');
});
afterAll(async () => {
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

const B = (s: string) => Buffer.from(s);
const NS = 1_000_000_000n;

function entry(path: string | Buffer, type: TreeEntry['type'], extra: Partial<TreeEntry> = {}): TreeEntry {
  return { path: typeof path === 'string' ? B(path) : path, type, mode: type === 'directory' ? 0o755 : 0o644, uid: 0, gid: 0, size: 0, mtimeNs: 1_600_000_000n * NS, ...extra };
}

async function* from<T>(items: T[]): AsyncGenerator<T> {
  for (const i of items) yield i;
}

/** Data of a synthetic file: its `content`, or `size` zero bytes in 1 MiB chunks. */
function dataOf(contents: Map<string, Buffer>) {
  return async function* (e: TreeEntry): AsyncGenerator<Buffer> {
    const c = contents.get(e.path.toString());
    if (c) {
      yield c;
      return;
    }
    for (let left = e.size; left > 0; left -= 1 << 20) yield Buffer.alloc(Math.min(left, 1 << 20));
  };
}

async function readBytes(stream: Readable): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of stream) parts.push(c as Buffer);
  return Buffer.concat(parts);
}

async function readAll(stream: Readable): Promise<{ header: TarHeader; data: Buffer }[]> {
  const out: { header: TarHeader; data: Buffer }[] = [];
  await readTar(stream, 'test tar', async (header, data) => {
    const parts: Buffer[] = [];
    for await (const c of data) parts.push(c);
    out.push({ header, data: Buffer.concat(parts) });
  });
  return out;
}

const NOT_UTF8 = Buffer.from([0x62, 0x61, 0x64, 0xff, 0xfe]);
const CAPABILITY = Buffer.from('0100000200300000000000000000000000000000', 'hex');

function sampleTree(): { entries: TreeEntry[]; contents: Map<string, Buffer> } {
  const contents = new Map<string, Buffer>([
    ['file', B('hello\n')],
    ['d/' + 'n'.repeat(98), pattern(1000, 1)],
    ['ütf-8 ✓', B('utf8\n')],
  ]);
  const long = `${'long/'.repeat(30)}file`;
  contents.set(long, pattern(513, 2));
  const entries: TreeEntry[] = [
    entry('', 'directory', { mode: 0o555 }),
    entry('d', 'directory', { mode: 0o2775, mtimeNs: -1_500_000_000n }),
    entry('d/' + 'n'.repeat(98), 'file', { size: 1000, uid: 3_000_000, gid: 70_000, mtimeNs: 1_577_934_245_123_456_789n }),
    entry('dev-c', 'character-device', { devmajor: 300, devminor: 70000, mode: 0o600 }),
    entry('dev-b', 'block-device', { devmajor: 8, devminor: 1 }),
    entry('fifo', 'fifo', { ino: 50, nlink: 2 }),
    entry('fifo-link', 'fifo', { ino: 50, nlink: 2 }),
    entry('file', 'file', { size: 6, mode: 0o4755, ino: 7, nlink: 3, xattrs: new Map([['security.capability', CAPABILITY], ['user.a=b%c', B('odd name')]]) }),
    entry('future', 'file', { mtimeNs: 99_999_999_999n * NS + 1n }),
    entry(long, 'file', { size: 513 }),
    entry('hard', 'file', { size: 6, mode: 0o4755, ino: 7, nlink: 3 }),
    entry(Buffer.concat([B('x'.repeat(120)), B('/'), NOT_UTF8]), 'file', { ino: 7, nlink: 3, size: 6 }),
    entry(NOT_UTF8, 'symlink', { symlinkTarget: NOT_UTF8, mode: 0o777 }),
    entry('socket', 'socket'),
    entry('sym-long', 'symlink', { symlinkTarget: B('t'.repeat(300)), mode: 0o777 }),
    entry('ütf-8 ✓', 'file', { size: 5, xattrs: new Map([['user.empty', Buffer.alloc(0)]]) }),
  ];
  return { entries, contents };
}

describe('packTree', () => {
  it('round-trips through readTar: names, types, owners, times, devices, links, binary xattrs', async () => {
    const { entries, contents } = sampleTree();
    const packed = packTree(from(entries), dataOf(contents));
    const [got, result] = await Promise.all([readAll(packed.stream), packed.done]);
    const written = entries.filter((e) => e.type !== 'socket');
    expect(got.map((g) => g.header.path)).toEqual(written.map((e) => e.path));
    expect(result.entries).toBe(written.length);
    expect(result.bytes % 10240).toBe(0);
    const firstOf = new Map<number, Buffer>();
    for (const [i, e] of written.entries()) {
      const { header: h, data } = got[i]!;
      const linked = e.ino !== undefined && firstOf.get(e.ino);
      if (e.ino !== undefined && !linked) firstOf.set(e.ino, e.path);
      expect(h.type).toBe(linked ? 'hardlink' : e.type);
      if (linked) expect(h.linkname.equals(linked)).toBe(true);
      expect([h.mode, h.uid, h.gid, h.mtimeNs]).toEqual([e.mode, e.uid, e.gid, e.mtimeNs]);
      if (e.type === 'symlink') expect(h.linkname.equals(e.symlinkTarget!)).toBe(true);
      if (e.type.endsWith('device')) expect([h.devmajor, h.devminor]).toEqual([e.devmajor, e.devminor]);
      if (e.type === 'file' && !linked) expect(data.equals(contents.get(e.path.toString()) ?? Buffer.alloc(0))).toBe(true);
      expect([...h.xattrs]).toEqual([...(e.xattrs ?? [])]);
    }
  });

  it('writes archives GNU tar lists and extracts, xattrs included', async () => {
    const { entries, contents } = sampleTree();
    const packed = packTree(from(entries.filter((e) => !e.type.endsWith('device'))), dataOf(contents));
    const out = join(tmp, 'extracted');
    await mkdir(out);
    const tar = execa('tar', ['--xattrs', '--xattrs-include=*', '--numeric-owner', '-xpf', '-', '-C', out], { input: packed.stream, env: { LC_ALL: 'C' } });
    await Promise.all([tar, packed.done]);
    const cap = await execa('getfattr', ['-n', 'security.capability', '-e', 'hex', '--only-values', join(out, 'file')], { encoding: 'buffer' });
    expect(Buffer.from(cap.stdout).equals(CAPABILITY)).toBe(true);
    expect((await lstat(join(out, 'hard'))).ino).toBe((await lstat(join(out, 'file'))).ino);
    expect((await readlink(join(out, 'sym-long'))).length).toBe(300);
    expect((await lstat(join(out, `${'long/'.repeat(30)}file`))).size).toBe(513);
    expect((await lstat(join(out, 'd'))).mtimeMs).toBe(-1500);
  });

  it('matches GNU tar byte for byte on a real directory tree', async () => {
    const root = join(tmp, 'tree');
    await mkdir(join(root, 'sub', 'n'.repeat(120)), { recursive: true });
    await writeFile(join(root, 'file'), pattern(70_000, 3));
    await link(join(root, 'file'), join(root, 'sub', 'hard'));
    await writeFile(join(root, 'sub', 'n'.repeat(120), 'deep'), 'deep\n');
    await writeFile(Buffer.concat([B(join(root, 'sub')), B('/'), NOT_UTF8]), 'not utf-8\n');
    await writeFile(join(root, 'ütf-8'), '');
    await symlink('l'.repeat(150), join(root, 'sub', 'long-link'));
    await symlink('short', join(root, 'link'));
    await execa('mkfifo', [join(root, 'fifo')]);
    await execa('mknod', [join(root, 'dev'), 'c', '4', '64']);
    await execa('chown', ['-h', '3000000:70000', join(root, 'sub', 'hard')]);
    await execa('touch', ['-h', '-d', '@1577934245.123456789', join(root, 'link')]);
    await execa('touch', ['-d', '@-1.25', join(root, 'ütf-8')]);

    async function* walk(dir: Buffer, rel: Buffer): AsyncGenerator<TreeEntry> {
      const st = await lstat(dir, { bigint: true });
      const type: TreeEntry['type'] = st.isDirectory() ? 'directory' : st.isSymbolicLink() ? 'symlink' : st.isFIFO() ? 'fifo' : st.isCharacterDevice() ? 'character-device' : 'file';
      yield {
        path: rel, type, mode: Number(st.mode & 0o7777n), uid: Number(st.uid), gid: Number(st.gid), size: Number(st.size),
        mtimeNs: st.mtimeNs, ino: Number(st.ino), nlink: Number(st.nlink), devmajor: Number(st.rdev >> 8n), devminor: Number(st.rdev & 0xffn),
        symlinkTarget: type === 'symlink' ? await readlink(dir, { encoding: 'buffer' }) : undefined,
      };
      if (type !== 'directory') return;
      for (const name of (await readdir(dir, { encoding: 'buffer' })).sort(Buffer.compare)) {
        yield* walk(Buffer.concat([dir, B('/'), name]), rel.length ? Buffer.concat([rel, B('/'), name]) : name);
      }
    }
    const ours = packTree(walk(B(root), Buffer.alloc(0)), (e) => createReadStream(Buffer.concat([B(root), B('/'), e.path])));
    const top = (await readdir(root, { encoding: 'buffer' })).sort(Buffer.compare).map((n) => n.toString());
    const gnu = gnuTar(root, HOST_TAR_ARGS, ['--no-recursion', '.', '--recursion', ...top]);
    const [a, b] = await Promise.all([Buffer.concat(await gnu.stream.toArray()), Buffer.concat(await ours.stream.toArray()), gnu.done, ours.done]);
    expect(b.length).toBe(a.length);
    let i = 0;
    while (i < a.length && a[i] === b[i]) i++;
    expect(i, `first difference at byte ${i}: ${JSON.stringify(b.subarray(i - (i % 512), i + 100).toString('latin1'))}`).toBe(a.length);
  });

  it('uses pax size records beyond 8 GiB - 1, readable by GNU tar', async () => {
    const size = 8 * 2 ** 30;
    const packed = packTree(from([entry('', 'directory'), entry('big', 'file', { size }), entry('after', 'file', { size: 3 })]), dataOf(new Map([['after', B('end')]])));
    const list = execa('tar', ['-tvf', '-', '--numeric-owner'], { input: packed.stream, env: { LC_ALL: 'C' } });
    const [{ stdout }, result] = await Promise.all([list, packed.done]);
    expect(stdout).toMatch(/ 8589934592 .* big\n.* 3 .* after$/);
    expect(result.dataBytes).toBe(size + 3);
  });

  it('rejects data longer or shorter than the size, streamed or given at once', async () => {
    for (const atOnce of [false, true]) {
      for (const [size, data, message] of [[3, 'four', 'has more data than its size of 3 bytes'], [5, 'four', 'has 4 bytes of data, expected 5']] as const) {
        const packed = packTree(from([entry('f', 'file', { size })]), atOnce ? () => B(data) : async function* () {
          yield B(data);
        }, { input: 'tree' });
        packed.stream.on('error', () => undefined).resume();
        await expect(packed.done).rejects.toThrow(InputError);
        await expect(packed.done).rejects.toThrow(`tree: "f" ${message}`);
      }
    }
  });

  it('writes the same archive whether data is streamed in pieces or given at once', async () => {
    const { entries, contents } = sampleTree();
    // Pieces of every size around the gathering thresholds: 1 byte, 511, 64 KiB ± 1, 300 KiB.
    const sizes = [1, 511, 65535, 65536, 65537, 300 * 1024];
    const more = sizes.map((n, i) => entry(`more/${i}`, 'file', { size: n }));
    for (const [i, n] of sizes.entries()) contents.set(`more/${i}`, pattern(n, 10 + i));
    const all = [...entries, entry('more', 'directory'), ...more];
    const streamed = packTree(from(all), (e) => (async function* () {
      const data = contents.get(e.path.toString()) ?? Buffer.alloc(0);
      for (let at = 0; at < data.length; at += 1000) yield data.subarray(at, at + 1000);
    })());
    const atOnce = packTree(from(all), (e) => contents.get(e.path.toString()) ?? Buffer.alloc(0));
    const [a, b] = await Promise.all([readBytes(streamed.stream), readBytes(atOnce.stream), streamed.done, atOnce.done]);
    expect(b.equals(a)).toBe(true);
  });

  it('refuses names that could escape the root', async () => {
    for (const bad of ['../etc/passwd', '/etc/passwd', 'a/../../b', 'a//b', './a', 'a/.', 'a/', 'nul\0byte']) {
      const packed = packTree(from([entry(bad, 'file')]), dataOf(new Map()));
      packed.stream.on('error', () => undefined).resume();
      await expect(packed.done, bad).rejects.toThrow(InputError);
    }
    const rootFile = packTree(from([entry('', 'file')]), dataOf(new Map()));
    rootFile.stream.on('error', () => undefined).resume();
    await expect(rootFile.done).rejects.toThrow(/root is a file/);
  });

  it('pulls data only as fast as the consumer reads (backpressure)', async () => {
    let pulled = 0;
    const packed = packTree(from([entry('big', 'file', { size: 256 << 20 })]), async function* () {
      for (let i = 0; i < 256; i++) {
        pulled++;
        yield Buffer.alloc(1 << 20);
      }
    });
    const sink = new PassThrough({ highWaterMark: 1 << 20 });
    packed.stream.pipe(sink);
    await new Promise((r) => setTimeout(r, 200));
    expect(pulled).toBeLessThan(8);
    sink.resume();
    await packed.done;
    expect(pulled).toBe(256);
  });

  it('stops on abort and when the consumer goes away, settling done', async () => {
    const ac = new AbortController();
    const aborted = packTree(from([entry('big', 'file', { size: 64 << 20 })]), dataOf(new Map()), { signal: ac.signal });
    aborted.stream.on('error', () => undefined);
    aborted.stream.once('data', () => ac.abort());
    aborted.stream.resume();
    await expect(aborted.done).rejects.toThrow(CancelledError);

    const dropped = packTree(from([entry('big', 'file', { size: 64 << 20 })]), dataOf(new Map()));
    dropped.stream.once('data', () => dropped.stream.destroy());
    await expect(dropped.done).rejects.toThrow(/closed before the archive was complete/);
  });
});

describe('tar codec', () => {
  it('normalises the spellings of a path', () => {
    expect(normalizeTarPath(B('./a/b/'))).toEqual(B('a/b'));
    expect(normalizeTarPath(B('./'))).toEqual(B(''));
    expect(normalizeTarPath(B('.'))).toEqual(B(''));
    expect(normalizeTarPath(B('/abs'))).toEqual(B('abs'));
  });

  it('encodes pax records with byte lengths and raw values', () => {
    const value = Buffer.from([0, 0xff, 0x0a, 0x3d]);
    const enc = encodePaxRecords([['path', 'é'.repeat(50)], ['SCHILY.xattr.user.bin', value]]);
    const dec = decodePaxRecords(enc, 'test');
    expect(dec.get('path')!.toString()).toBe('é'.repeat(50));
    expect(dec.get('SCHILY.xattr.user.bin')).toEqual(value);
    expect(enc.subarray(0, 4).toString()).toBe('110 ');
  });
});
