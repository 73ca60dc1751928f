import type { Readable } from 'node:stream';
import { InputError } from '../errors.js';

/**
 * POSIX tar (ustar + pax) header codec and a streaming reader.
 *
 * We read tar ourselves rather than through tar-stream's extract because tar-stream decodes pax
 * values as UTF-8 text, which corrupts binary xattrs (security.capability) and non-UTF-8 names.
 * Names, link targets and xattr values stay raw bytes here.
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
      if (block.every((b) => b === 0)) return;
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
      for (const [k, v] of pax) if (k.startsWith('SCHILY.xattr.')) xattrs.set(k.slice('SCHILY.xattr.'.length), v);
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
