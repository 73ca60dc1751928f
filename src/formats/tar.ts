import { Readable } from 'node:stream';
import { CancelledError, InputError, throwIfAborted } from '../errors.js';

/**
 * POSIX tar (ustar + pax) header codec, a streaming reader and a streaming writer.
 *
 * We read tar ourselves rather than through tar-stream's extract because tar-stream decodes pax
 * values as UTF-8 text, which corrupts binary xattrs (security.capability) and non-UTF-8 names.
 * Names, link targets and xattr values stay raw bytes here. We write it ourselves too: tar-stream's
 * pack takes names as strings, refuses a body on a pax-header entry of our own, and lays header
 * fields out differently from GNU tar, whose output the writer reproduces byte for byte so that
 * both engines can produce the same layer.
 */

export type TarEntryType = 'file' | 'hardlink' | 'symlink' | 'character-device' | 'block-device' | 'directory' | 'fifo';

export interface TarHeader {
  /** Path as raw bytes, without leading "./" and trailing "/". The root directory is "". */
  path: Buffer;
  type: TarEntryType;
  mode: number;
  uid: number;
  gid: number;
  size: number;
  /** Modification time in nanoseconds since the epoch (pax precision when present). */
  mtimeNs: bigint;
  /** Symlink target or, for hard links, the path of the entry linked to (normalised like path). */
  linkname: Buffer;
  devmajor: number;
  devminor: number;
  /** Extended attributes from SCHILY.xattr.* records, values raw. */
  xattrs: Map<string, Buffer>;
}

const BLOCK = 512;

const TYPEFLAGS: Record<string, TarEntryType> = {
  '0': 'file', '\0': 'file', '7': 'file', '1': 'hardlink', '2': 'symlink', '3': 'character-device',
  '4': 'block-device', '5': 'directory', '6': 'fifo',
};

/** Strip "./" prefixes, leading and trailing slashes: tools spell the same path several ways. */
export function normalizeTarPath(raw: Buffer): Buffer {
  let s = 0;
  let e = raw.length;
  for (;;) {
    if (raw[s] === 0x2e && raw[s + 1] === 0x2f) s += 2;
    else if (raw[s] === 0x2f) s += 1;
    else break;
  }
  while (e > s && raw[e - 1] === 0x2f) e--;
  if (e - s === 1 && raw[s] === 0x2e) return Buffer.alloc(0);
  return raw.subarray(s, e);
}

function cstr(buf: Buffer, start: number, len: number): Buffer {
  const end = buf.indexOf(0, start);
  return buf.subarray(start, end === -1 || end > start + len ? start + len : end);
}

function numeric(buf: Buffer, start: number, len: number, what: string, input: string): number {
  // GNU base-256 for values that do not fit in octal.
  if (buf[start]! & 0x80) {
    let v = BigInt(buf[start]! & 0x7f);
    for (let i = 1; i < len; i++) v = (v << 8n) | BigInt(buf[start + i]!);
    return Number(v);
  }
  const text = cstr(buf, start, len).toString('latin1').trim();
  if (text === '') return 0;
  if (!/^[0-7]+$/.test(text)) throw new InputError(input, `tar header field ${what} is not octal: ${JSON.stringify(text)}`);
  return parseInt(text, 8);
}

function checksumOk(block: Buffer): boolean {
  const stored = parseInt(cstr(block, 148, 8).toString('latin1').trim(), 8);
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 32 : block[i]!;
  return sum === stored;
}

/** Parse pax extended header records ("LEN key=value\n"), values raw. */
export function decodePaxRecords(data: Buffer, input: string): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  let pos = 0;
  while (pos < data.length) {
    const sp = data.indexOf(0x20, pos);
    if (sp === -1) break;
    const len = parseInt(data.subarray(pos, sp).toString('latin1'), 10);
    if (!Number.isSafeInteger(len) || len <= 0 || pos + len > data.length) throw new InputError(input, `malformed pax record at byte ${pos}`);
    const rec = data.subarray(sp + 1, pos + len - 1);
    const eq = rec.indexOf(0x3d);
    if (eq === -1) throw new InputError(input, `pax record without "=" at byte ${pos}`);
    out.set(rec.subarray(0, eq).toString('utf8'), rec.subarray(eq + 1));
    pos += len;
  }
  return out;
}

/** Encode pax records; lengths count bytes, values are written raw. */
export function encodePaxRecords(records: Iterable<[string, Buffer | string]>): Buffer {
  const parts: Buffer[] = [];
  for (const [key, value] of records) {
    const body = Buffer.concat([Buffer.from(` ${key}=`), Buffer.isBuffer(value) ? value : Buffer.from(value), Buffer.from('\n')]);
    let len = body.length + 1;
    while (String(len).length + body.length !== len) len = String(len).length + body.length;
    parts.push(Buffer.from(String(len)), body);
  }
  return Buffer.concat(parts);
}

const XATTR_KEY = 'SCHILY.xattr.';

/** GNU tar escapes "%" and "=" in xattr names inside pax keywords (the "=" would end the keyword). */
function encodeXattrName(name: string): string {
  return name.replace(/%/g, '%25').replace(/=/g, '%3D');
}

function decodeXattrName(key: string): string {
  return key.replace(/%(25|3D)/g, (m) => (m === '%25' ? '%' : '='));
}

function paxTimeNs(v: Buffer): bigint {
  const m = /^(-?)(\d+)(?:\.(\d{1,9})\d*)?$/.exec(v.toString('latin1'));
  if (!m) return 0n;
  const ns = BigInt(m[2]!) * 1_000_000_000n + BigInt((m[3] ?? '').padEnd(9, '0'));
  return m[1] ? -ns : ns;
}

/**
 * Read a tar stream entry by entry. `onEntry` receives each header and an async iterator over
 * the entry's data; data not consumed is skipped. Stops at the end-of-archive marker.
 */
export async function readTar(
  stream: Readable,
  input: string,
  onEntry: (header: TarHeader, data: AsyncIterable<Buffer>) => Promise<void>,
): Promise<void> {
  const it = stream[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
  let pending: Buffer[] = [];
  let pendingLen = 0;
  let ended = false;

  async function fill(n: number): Promise<boolean> {
    while (pendingLen < n && !ended) {
      const r = await it.next();
      if (r.done) ended = true;
      else {
        const chunk = Buffer.isBuffer(r.value) ? r.value : Buffer.from(r.value);
        pending.push(chunk);
        pendingLen += chunk.length;
      }
    }
    return pendingLen >= n;
  }
  function take(n: number): Buffer {
    const all = pending.length === 1 ? pending[0]! : Buffer.concat(pending, pendingLen);
    const out = all.subarray(0, n);
    const rest = all.subarray(n);
    pending = rest.length ? [rest] : [];
    pendingLen = rest.length;
    return out;
  }
  async function takeExact(n: number, what: string): Promise<Buffer> {
    if (!(await fill(n))) throw new InputError(input, `tar stream ends inside ${what}`);
    return Buffer.from(take(n));
  }
  // Bytes of the current entry's data not yet handed out; what the consumer leaves is skipped.
  let left = 0;
  async function* body(): AsyncGenerator<Buffer> {
    while (left > 0) {
      if (pendingLen === 0 && !(await fill(1))) throw new InputError(input, 'tar stream ends inside file data');
      const n = Math.min(left, pendingLen);
      left -= n;
      yield Buffer.from(take(n));
    }
  }
  async function skip(n: number): Promise<void> {
    let left = n;
    while (left > 0) {
      if (pendingLen === 0 && !(await fill(1))) throw new InputError(input, 'tar stream ends inside file data');
      left -= take(Math.min(left, pendingLen)).length;
    }
  }

  let pax = new Map<string, Buffer>();
  let longName: Buffer | undefined;
  let longLink: Buffer | undefined;
  try {
    for (;;) {
      if (!(await fill(BLOCK))) {
        if (pendingLen === 0) return; // tolerate a missing end-of-archive marker only at a block boundary
        throw new InputError(input, 'tar stream ends inside a header block');
      }
      const block = take(BLOCK);
      if (block.every((b) => b === 0)) {
        // Read the record padding to its end, so a producer piping into us finishes cleanly.
        while (!ended) if ((await it.next()).done) ended = true;
        return;
      }
      if (!checksumOk(block)) throw new InputError(input, 'tar header checksum mismatch');
      const flag = String.fromCharCode(block[156]!);
      const size = numeric(block, 124, 12, 'size', input);
      const padded = Math.ceil(size / BLOCK) * BLOCK;
      if (flag === 'x' || flag === 'g' || flag === 'L' || flag === 'K') {
        const data = (await takeExact(padded, 'an extended header')).subarray(0, size);
        if (flag === 'x') pax = new Map([...pax, ...decodePaxRecords(data, input)]);
        else if (flag === 'L') longName = cstr(data, 0, data.length);
        else if (flag === 'K') longLink = cstr(data, 0, data.length);
        continue;
      }
      const type = TYPEFLAGS[flag];
      if (!type) throw new InputError(input, `unsupported tar entry type ${JSON.stringify(flag)}`);
      let name = cstr(block, 0, 100);
      const magic = block.subarray(257, 263).toString('latin1');
      if (magic.startsWith('ustar') && block[345]) name = Buffer.concat([cstr(block, 345, 155), Buffer.from('/'), name]);
      const paxPath = pax.get('path');
      const paxLink = pax.get('linkpath');
      const paxSize = pax.get('size');
      const xattrs = new Map<string, Buffer>();
      for (const [k, v] of pax) if (k.startsWith(XATTR_KEY)) xattrs.set(decodeXattrName(k.slice(XATTR_KEY.length)), v);
      const header: TarHeader = {
        path: normalizeTarPath(paxPath ?? longName ?? name),
        type,
        mode: numeric(block, 100, 8, 'mode', input) & 0o7777,
        uid: pax.has('uid') ? Number(pax.get('uid')!.toString()) : numeric(block, 108, 8, 'uid', input),
        gid: pax.has('gid') ? Number(pax.get('gid')!.toString()) : numeric(block, 116, 8, 'gid', input),
        size: paxSize ? Number(paxSize.toString()) : size,
        mtimeNs: pax.has('mtime') ? paxTimeNs(pax.get('mtime')!) : BigInt(numeric(block, 136, 12, 'mtime', input)) * 1_000_000_000n,
        linkname: paxLink ?? longLink ?? cstr(block, 157, 100),
        devmajor: numeric(block, 329, 8, 'devmajor', input),
        devminor: numeric(block, 337, 8, 'devminor', input),
        xattrs,
      };
      if (type === 'hardlink') header.linkname = normalizeTarPath(header.linkname);
      pax = new Map();
      longName = undefined;
      longLink = undefined;
      const dataSize = type === 'file' ? header.size : 0;
      const dataPadded = Math.ceil(dataSize / BLOCK) * BLOCK;
      left = dataSize;
      await onEntry(header, body());
      await skip(left + dataPadded - dataSize);
      left = 0;
    }
  } finally {
    await it.return?.();
  }
}

export type TreeEntryType = 'file' | 'directory' | 'symlink' | 'character-device' | 'block-device' | 'fifo' | 'socket';

/** One node of a file tree to archive; ExtFileSystem's entries are TreeEntries. */
export interface TreeEntry {
  /** Raw bytes relative to the root, components joined by "/"; the root itself is empty. */
  path: Buffer;
  type: TreeEntryType;
  /** Permission bits (07777). */
  mode: number;
  uid: number;
  gid: number;
  /** Data length of a regular file (ignored for other types). */
  size: number;
  mtimeNs: bigint;
  symlinkTarget?: Buffer;
  devmajor?: number;
  devminor?: number;
  xattrs?: Map<string, Buffer>;
  /** Inode number and link count: non-directories sharing an inode become hard links. */
  ino?: number;
  nlink?: number;
}

export interface PackResult {
  /** Entries written (sockets are left out, as GNU tar does). */
  entries: number;
  /** Regular files written with their data. */
  files: number;
  /** File data bytes. */
  dataBytes: number;
  /** Archive length. */
  bytes: number;
}

export interface PackOptions {
  signal?: AbortSignal;
  /** Names the tree in error messages. */
  input?: string;
}

const RECORD = 10240;
/** packTree yields pieces smaller than GATHER_PIECE in blocks of at least GATHER bytes. */
const GATHER = 256 * 1024;
const GATHER_PIECE = 64 * 1024;
/** Padding is cut from here: never written to, so shared by every entry. */
const ZERO_BLOCK = Buffer.alloc(BLOCK);
const MAX_OCTAL_7 = 0o7777777;
const MAX_OCTAL_11 = 0o77777777777;
const NS = 1_000_000_000n;
const FLAGS: Record<Exclude<TreeEntryType, 'socket'>, string> = {
  file: '0', directory: '5', symlink: '2', 'character-device': '3', 'block-device': '4', fifo: '6',
};

function putOctal(block: Buffer, off: number, len: number, value: number): void {
  block.write(value.toString(8).padStart(len - 1, '0'), off, 'latin1');
  block[off + len - 1] = 0;
}

interface UstarFields {
  name: Buffer;
  mode: number;
  uid: number;
  gid: number;
  size: number;
  mtime: number;
  typeflag: string;
  linkname?: Buffer;
  /** Device fields are written (zero unless a device) in file headers, left empty in pax headers. */
  dev?: [number, number];
}

/** A ustar header block laid out byte for byte as GNU tar --format=posix writes it. */
function ustarHeader(f: UstarFields): Buffer {
  const block = Buffer.alloc(BLOCK);
  f.name.copy(block, 0, 0, Math.min(100, f.name.length));
  putOctal(block, 100, 8, f.mode);
  putOctal(block, 108, 8, f.uid);
  putOctal(block, 116, 8, f.gid);
  putOctal(block, 124, 12, f.size);
  putOctal(block, 136, 12, f.mtime);
  block.write(f.typeflag, 156, 'latin1');
  f.linkname?.copy(block, 157, 0, Math.min(100, f.linkname.length));
  block.write('ustar\x0000', 257, 'latin1');
  if (f.dev) {
    putOctal(block, 329, 8, f.dev[0]);
    putOctal(block, 337, 8, f.dev[1]);
  }
  block.fill(0x20, 148, 156);
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += block[i]!;
  block.write(sum.toString(8).padStart(6, '0'), 148, 'latin1');
  block[154] = 0;
  block[155] = 0x20;
  return block;
}

function isAscii(b: Buffer): boolean {
  for (const c of b) if (c & 0x80) return false;
  return true;
}

/** A pax time: seconds and a fraction without trailing zeros, as GNU tar prints it. */
function paxTime(ns: bigint): string {
  const neg = ns < 0n;
  const abs = neg ? -ns : ns;
  const frac = (abs % NS).toString().padStart(9, '0').replace(/0+$/, '');
  return `${neg ? '-' : ''}${abs / NS}${frac ? `.${frac}` : ''}`;
}

/** Throw unless `path` is a plain relative path: no empty, "." or ".." component, no NUL. */
function checkTreePath(path: Buffer, input: string): void {
  if (path.length === 0) return;
  let start = 0;
  for (let i = 0; i <= path.length; i++) {
    if (i < path.length && path[i] === 0) throw new InputError(input, `path ${JSON.stringify(path.toString('utf8'))} contains NUL`);
    if (i === path.length || path[i] === 0x2f) {
      const len = i - start;
      const dots = len > 0 && len <= 2 && path.subarray(start, i).every((c) => c === 0x2e);
      if (len === 0 || dots) throw new InputError(input, `path ${JSON.stringify(path.toString('utf8'))} is not a plain relative path`);
      start = i + 1;
    }
  }
}

/** "%d/PaxHeaders/%f" of GNU tar: the pax header's own name, beside the file it describes. */
function paxHeaderName(path: Buffer): Buffer {
  if (path.length === 0) return Buffer.from('./PaxHeaders/.');
  const slash = path.lastIndexOf(0x2f);
  const dir = slash === -1 ? Buffer.from('.') : path.subarray(0, slash);
  return Buffer.concat([dir, Buffer.from('/PaxHeaders/'), path.subarray(slash + 1)]);
}

/**
 * The headers of one entry: a pax extended header when a value does not fit ustar (long or
 * non-ASCII name, long link target, big ids or size, sub-second or out-of-range mtime) or there
 * are xattrs, then the ustar header. Records are written raw (binary xattr values such as
 * security.capability survive), in GNU tar's order.
 */
function entryHeaders(e: TreeEntry, typeflag: string, linkname: Buffer | undefined, size: number): Buffer {
  const name = e.path.length === 0 ? Buffer.from('./') : e.type === 'directory' ? Buffer.concat([e.path, Buffer.from('/')]) : e.path;
  const records: [string, Buffer | string][] = [];
  if (linkname && linkname.length > 100) records.push(['linkpath', linkname]);
  if (name.length > 100 || !isAscii(name)) records.push(['path', name]);
  if (e.uid > MAX_OCTAL_7) records.push(['uid', String(e.uid)]);
  if (e.gid > MAX_OCTAL_7) records.push(['gid', String(e.gid)]);
  if (size > MAX_OCTAL_11) records.push(['size', String(size)]);
  const sec = e.mtimeNs >= 0n ? e.mtimeNs / NS : -((-e.mtimeNs + NS - 1n) / NS);
  const secFits = sec >= 0n && sec <= BigInt(MAX_OCTAL_11);
  if (!secFits || e.mtimeNs % NS !== 0n) records.push(['mtime', paxTime(e.mtimeNs)]);
  for (const [k, v] of e.xattrs ?? []) records.push([XATTR_KEY + encodeXattrName(k), v]);

  const mtime = secFits ? Number(sec) : 0;
  const dev: [number, number] = [e.devmajor ?? 0, e.devminor ?? 0];
  if (dev[0] > MAX_OCTAL_7 || dev[1] > MAX_OCTAL_7 || dev[0] < 0 || dev[1] < 0) throw new Error(`device number ${dev[0]}:${dev[1]} does not fit a tar header`);
  const header = ustarHeader({
    name,
    mode: e.mode & 0o7777,
    uid: e.uid > MAX_OCTAL_7 ? 0 : e.uid,
    gid: e.gid > MAX_OCTAL_7 ? 0 : e.gid,
    size: size > MAX_OCTAL_11 ? 0 : size,
    mtime,
    typeflag,
    linkname,
    dev,
  });
  if (records.length === 0) return header;
  const pax = encodePaxRecords(records);
  const paxHeader = ustarHeader({
    name: paxHeaderName(e.path),
    mode: 0o644,
    uid: 0,
    gid: 0,
    size: pax.length,
    mtime: sec < 0n ? 0 : sec > BigInt(MAX_OCTAL_11) ? MAX_OCTAL_11 : Number(sec),
    typeflag: 'x',
  });
  return Buffer.concat([paxHeader, pax, Buffer.alloc(padding(pax.length)), header]);
}

function padding(n: number): number {
  return (BLOCK - (n % BLOCK)) % BLOCK;
}

/**
 * Stream a file tree as a POSIX (pax) tar, byte for byte what GNU tar 1.34 writes with
 * `--format=posix --numeric-owner --xattrs --xattrs-include='*' --sort=name
 * --pax-option=delete=atime,delete=ctime` given the same entries in the same order, except that
 * names carry no "./" prefix (the root is "./", other entries "etc/", "etc/passwd").
 * Hard links point at the first name written; sockets are left out. File data is pulled from
 * `readData` only as the consumer reads (backpressure), or given by it at once as one Buffer (a
 * small file that is at hand), and must be exactly `size` bytes.
 * `done` settles when the archive has been produced, rejecting on any error or an early close.
 */
export function packTree<E extends TreeEntry>(
  entries: AsyncIterable<E>,
  readData: (entry: E) => AsyncIterable<Buffer> | Buffer,
  opts: PackOptions = {},
): { stream: Readable; done: Promise<PackResult> } {
  const input = opts.input ?? 'file tree';
  let resolve!: (r: PackResult) => void;
  let reject!: (err: unknown) => void;
  const done = new Promise<PackResult>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  // The caller may only watch the stream; the rejection still reaches whoever awaits `done`.
  done.catch(() => undefined);

  async function* produce(): AsyncGenerator<Buffer> {
    const result: PackResult = { entries: 0, files: 0, dataBytes: 0, bytes: 0 };
    const firstName = new Map<number, Buffer>();
    let finished = false;
    // Headers, small files' data and padding, gathered into blocks: a piece costs each stream after
    // this one about as much as a block does, and most entries are a header and a few kilobytes.
    let gathered: Buffer[] = [];
    let gatheredBytes = 0;
    const gather = (b: Buffer) => {
      gathered.push(b);
      gatheredBytes += b.length;
    };
    const release = (): Buffer => {
      const block = gathered.length === 1 ? gathered[0]! : Buffer.concat(gathered, gatheredBytes);
      gathered = [];
      gatheredBytes = 0;
      return block;
    };
    try {
      for await (const e of entries) {
        throwIfAborted(opts.signal);
        checkTreePath(e.path, input);
        if (e.path.length === 0 && e.type !== 'directory') throw new InputError(input, `the root is a ${e.type}, not a directory`);
        if (e.type === 'socket') continue;
        const linked = e.type !== 'directory' && (e.nlink ?? 1) > 1 && e.ino !== undefined ? firstName.get(e.ino) : undefined;
        if (linked) {
          const h = entryHeaders(e, '1', linked, 0);
          result.bytes += h.length;
          result.entries++;
          gather(h);
        } else {
          if (e.type !== 'directory' && (e.nlink ?? 1) > 1 && e.ino !== undefined) firstName.set(e.ino, e.path);
          if (e.type === 'symlink' && !e.symlinkTarget) throw new InputError(input, `symlink ${JSON.stringify(e.path.toString('utf8'))} has no target`);
          const size = e.type === 'file' ? e.size : 0;
          const h = entryHeaders(e, FLAGS[e.type], e.type === 'symlink' ? e.symlinkTarget : undefined, size);
          result.bytes += h.length;
          result.entries++;
          gather(h);
          if (e.type === 'file') {
            const tooMuch = () => new InputError(input, `${JSON.stringify(e.path.toString('utf8'))} has more data than its size of ${size} bytes`);
            const data = readData(e);
            let written = 0;
            for await (const chunk of Buffer.isBuffer(data) ? [data] : data) {
              throwIfAborted(opts.signal);
              written += chunk.length;
              if (written > size) throw tooMuch();
              if (chunk.length < GATHER_PIECE) {
                gather(chunk);
                if (gatheredBytes >= GATHER) yield release();
              } else {
                if (gatheredBytes) yield release();
                yield chunk;
              }
            }
            if (written !== size) throw new InputError(input, `${JSON.stringify(e.path.toString('utf8'))} has ${written} bytes of data, expected ${size}`);
            const pad = padding(size);
            if (pad) gather(ZERO_BLOCK.subarray(0, pad));
            result.files++;
            result.dataBytes += size;
            result.bytes += size + pad;
          }
        }
        if (gatheredBytes >= GATHER) yield release();
      }
      // End-of-archive marker, then zeros to a whole 10 KiB record like GNU tar's default blocking.
      const tail = 2 * BLOCK + ((RECORD - ((result.bytes + 2 * BLOCK) % RECORD)) % RECORD);
      result.bytes += tail;
      gather(Buffer.alloc(tail));
      yield release();
      finished = true;
      resolve(result);
    } catch (err) {
      reject(err);
      throw err;
    } finally {
      if (!finished) reject(new CancelledError('the tar stream was closed before the archive was complete'));
    }
  }

  return { stream: Readable.from(produce(), { objectMode: false, highWaterMark: 1 << 20 }), done };
}

/** One regular file to add to an archive, its whole data in memory (a small generated file). */
export interface AddedFile {
  entry: TreeEntry & { type: 'file' };
  data: Buffer;
}

/**
 * Copy a tar stream up to its end-of-archive marker, add `files` after its last entry (headers
 * written as packTree writes them), then end it the way packTree does: two zero blocks and zeros
 * to a whole 10 KiB record. The copy is byte for byte, so equal archives in give equal archives
 * out whichever tool wrote them. Headers are walked to find the marker; data passes through unread.
 */
export function appendToTar(archive: Readable, files: readonly AddedFile[], opts: PackOptions = {}): Readable {
  const input = opts.input ?? 'tar stream';
  async function* produce(): AsyncGenerator<Buffer> {
    let header: Buffer = Buffer.alloc(0);
    // Bytes of entry data (and padding) to pass through before the next header.
    let skip = 0;
    let pax: Buffer[] | undefined;
    let paxLeft = 0;
    let paxSize: number | undefined;
    let total = 0;
    let ended = false;
    for await (const chunk of archive as AsyncIterable<Buffer>) {
      throwIfAborted(opts.signal);
      let pos = 0;
      // After the marker only padding follows: read it so that the producer finishes cleanly.
      while (!ended && pos < chunk.length) {
        if (skip > 0) {
          const piece = chunk.subarray(pos, pos + Math.min(skip, chunk.length - pos));
          if (pax && paxLeft > 0) {
            pax.push(piece.subarray(0, paxLeft));
            paxLeft -= Math.min(paxLeft, piece.length);
            if (paxLeft === 0) {
              const size = decodePaxRecords(Buffer.concat(pax), input).get('size');
              paxSize = size ? Number(size.toString('latin1')) : undefined;
              pax = undefined;
            }
          }
          skip -= piece.length;
          pos += piece.length;
          total += piece.length;
          yield piece;
          continue;
        }
        const take = chunk.subarray(pos, pos + BLOCK - header.length);
        header = header.length ? Buffer.concat([header, take]) : take;
        pos += take.length;
        if (header.length < BLOCK) break;
        const block = header;
        header = Buffer.alloc(0);
        if (block.every((b) => b === 0)) {
          ended = true;
          break;
        }
        if (!checksumOk(block)) throw new InputError(input, `tar header checksum mismatch at byte ${total}`);
        const flag = String.fromCharCode(block[156]!);
        let size = numeric(block, 124, 12, 'size', input);
        if (flag === 'x') {
          pax = [];
          paxLeft = size;
        } else if (flag !== 'g' && flag !== 'L' && flag !== 'K') {
          if (paxSize !== undefined) size = paxSize;
          paxSize = undefined;
          if (!(flag === '0' || flag === '\0' || flag === '7')) size = 0;
        }
        skip = size + padding(size);
        total += BLOCK;
        yield block;
      }
    }
    if (!ended) throw new InputError(input, 'tar stream ends without an end-of-archive marker');
    for (const { entry, data } of files) {
      checkTreePath(entry.path, input);
      if (data.length !== entry.size) throw new Error(`added file ${entry.path.toString('utf8')}: ${data.length} bytes of data, size ${entry.size}`);
      const h = entryHeaders(entry, FLAGS.file, undefined, data.length);
      const pad = Buffer.alloc(padding(data.length));
      total += h.length + data.length + pad.length;
      yield Buffer.concat([h, data, pad]);
    }
    yield Buffer.alloc(2 * BLOCK + ((RECORD - ((total + 2 * BLOCK) % RECORD)) % RECORD));
  }
  return Readable.from(produce(), { objectMode: false, highWaterMark: 1 << 20 });
}
