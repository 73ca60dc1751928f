import { createHash } from 'node:crypto';
import { constants as zlibConstants, gunzipSync } from 'node:zlib';
import type { XmlNode } from '@vates/xml/format';
import { XMLValidator } from 'fast-xml-parser';
import { parseXml } from '@vates/xml/parse';
import { xmlRpcParser } from '@vates/xml-rpc/parser';
import xxhash from 'xxhash-wasm';
import { InputError } from '../errors.js';
import { checkReadRange, type Source } from './source.js';
import { decodePaxRecords, normalizeTarPath } from './tar.js';

/**
 * XVA version 2, what `xe vm-export` (XAPI) and Xen Orchestra write: a tar holding ova.xml (the
 * VM's metadata as one XML-RPC value) and, per disk, a directory named by the VDI's id in ova.xml
 * ("Ref:3") holding 1 MiB blocks "Ref:3/00000042", each with a sibling holding its checksum:
 * "….checksum" (SHA-1, 40 hex digits) or "….xxhash" (XXH64 with seed 0, printed "%016LX").
 * All-zero blocks are left out, except the first and the last, which XAPI always writes.
 *
 * The number in a block's name is a counter, not an offset (XAPI's stream_vdi.ml recv_all_vdi,
 * dissect's XVAStream): each number skipped is 1 MiB of zeros, and XAPI may write a zero-length
 * block as a keep-alive, which takes a number but no place on the disk.
 *
 * The disk is read in place: the tar's headers are indexed in one pass that seeks over the data,
 * and reads go straight to the blocks' bytes inside the .xva.
 */

export const BLOCK_SIZE = 1 << 20;

export type ChecksumKind = 'sha1' | 'xxhash';

const CHECKSUMS: Record<ChecksumKind, { suffix: string; hexDigits: number; what: string }> = {
  sha1: { suffix: '.checksum', hexDigits: 40, what: 'SHA-1' },
  xxhash: { suffix: '.xxhash', hexDigits: 16, what: 'XXH64' },
};

const OVA_XML = 'ova.xml';
/** XAPI's ova.xml of one VM is tens of KiB; this bounds memory for a hostile one. */
const OVA_XML_LIMIT = 64 << 20;
const TAR_BLOCK = 512;
/** Pax and GNU long-name records are a few hundred bytes; a larger one is not an XVA's. */
const TAR_RECORD_LIMIT = 1 << 20;
const MAX_LISTED = 10;

export interface XvaVdi {
  /** The VDI's id in ova.xml ("Ref:3"), which names its block directory in the tar. */
  id: string;
  nameLabel: string;
  /** virtual_size: the disk's size in bytes. */
  virtualSize: number;
}

export interface XvaOva {
  version: 2;
  /** version.export_vsn, when given. */
  exportVsn?: number;
  /** The VM's name_label. */
  vmName: string;
  vdis: XvaVdi[];
  /** The disk behind the VBD with userdevice 0, else device xvda, else the one bootable disk, else the only disk. */
  rootVdi: XvaVdi;
  rootUserdevice: string;
}

export interface TarMember {
  /** Normalised path ("./" and trailing "/" removed). */
  name: string;
  typeflag: string;
  /** Where the entry's data starts in the tar. */
  dataOffset: number;
  size: number;
}

export interface XvaBlock {
  counter: number;
  /** As in the tar: "Ref:3/00000042". */
  name: string;
  /** Where the block's bytes go in the disk. */
  offset: number;
  length: number;
  /** Where the block's bytes are in the .xva. */
  dataOffset: number;
  checksum: { kind: ChecksumKind; dataOffset: number };
}

export interface XvaDiskLayout {
  vdi: XvaVdi;
  /** Every block in counter order, keep-alive (zero-length) blocks included. */
  blocks: XvaBlock[];
  /** Block numbers skipped: 1 MiB of zeros each. */
  leftOut: number;
  /** Zero-length blocks. */
  keepAlive: number;
  checksums: ChecksumKind[];
}

type Struct = Record<string, unknown>;

function isStruct(v: unknown): v is Struct {
  return typeof v === 'object' && v !== null && !Array.isArray(v) && !Buffer.isBuffer(v) && !(v instanceof Date);
}

function str(v: unknown): string {
  return typeof v === 'string' ? v : '';
}

/** XML-RPC booleans parse to true; XAPI never writes them as text, others might. */
function isTrue(v: unknown): boolean {
  return v === true || v === '1' || v === 'true';
}

function firstLines(err: unknown): string {
  return String((err as Error)?.message ?? err).split('\n').filter(Boolean).join(', ');
}

/** XAPI writes int64 fields as strings; an XML-RPC int or double is accepted too. */
function byteCount(v: unknown): number | undefined {
  if (typeof v === 'number') return Number.isSafeInteger(v) && v > 0 ? v : undefined;
  if (typeof v !== 'string' || !/^[0-9]{1,20}$/.test(v.trim())) return undefined;
  const n = BigInt(v.trim());
  return n > 0n && n <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(n) : undefined;
}

/** A VDI's id names a directory in the tar: one path component. */
function isDirectoryName(id: string): boolean {
  return id !== '' && id !== '.' && id !== '..' && !/[/\\\0]/.test(id);
}

/** Parse and check an XVA version 2 ova.xml; `input` names it in errors. */
export function parseXvaOvaXml(xml: string | Buffer, input: string): XvaOva {
  const doc = (typeof xml === 'string' ? xml : xml.toString('utf8')).replace(/^\uFEFF/, '');
  // Checked first by a linear validator: sax (under @vates/xml) takes quadratic time on some malformed input.
  const valid = XMLValidator.validate(doc);
  if (valid !== true) throw new InputError(input, `malformed XML at line ${valid.err.line}, column ${valid.err.col}: ${valid.err.msg}`);
  let tree: XmlNode | undefined;
  try {
    tree = parseXml(doc);
  } catch (err) {
    throw new InputError(input, `malformed XML: ${firstLines(err)}`, { cause: err });
  }
  // sax leaves an unclosed root element out of the tree rather than failing.
  if (!tree) throw new InputError(input, 'malformed XML: no complete root element');
  if (tree.name !== 'value') throw new InputError(input, `the root element is <${tree.name}>, not <value>: not an XVA version 2 ova.xml`);
  let top: unknown;
  try {
    top = xmlRpcParser.parse(tree);
  } catch (err) {
    throw new InputError(input, `not a well-formed XML-RPC value: ${firstLines(err)}`, { cause: err });
  }
  if (!isStruct(top) || !Array.isArray(top['objects'])) throw new InputError(input, 'the top-level value is not a struct with an objects array: not an XVA version 2 ova.xml');
  const version = isStruct(top['version']) ? top['version'] : {};
  const exportVsn = byteCount(version['export_vsn']);

  const objects = new Map<string, { cls: string; snapshot: Struct }>();
  for (const [i, o] of (top['objects'] as unknown[]).entries()) {
    if (!isStruct(o) || typeof o['class'] !== 'string' || typeof o['id'] !== 'string' || !isStruct(o['snapshot'])) {
      throw new InputError(input, `object number ${i + 1} lacks a class, an id or a snapshot struct`);
    }
    if (objects.has(o['id'])) throw new InputError(input, `two objects have the id ${JSON.stringify(o['id'])}`);
    objects.set(o['id'], { cls: o['class'], snapshot: o['snapshot'] });
  }

  const vdis: XvaVdi[] = [];
  for (const [id, o] of objects) {
    if (o.cls !== 'VDI') continue;
    if (!isDirectoryName(id)) throw new InputError(input, `VDI id ${JSON.stringify(id)} cannot name a directory in the tar`);
    const virtualSize = byteCount(o.snapshot['virtual_size']);
    if (virtualSize === undefined) {
      throw new InputError(input, `VDI ${id} has virtual_size ${JSON.stringify(o.snapshot['virtual_size'] ?? null)}, not a number of bytes between 1 and ${Number.MAX_SAFE_INTEGER}`);
    }
    vdis.push({ id, nameLabel: str(o.snapshot['name_label']), virtualSize });
  }

  const vms = [...objects].filter(([, o]) => o.cls === 'VM' && !isTrue(o.snapshot['is_a_snapshot']) && !isTrue(o.snapshot['is_control_domain']));
  if (vms.length !== 1) throw new InputError(input, `expected one VM (not a snapshot, not dom0), found ${vms.length}`);
  const [vmId, vm] = vms[0]!;

  const disks: { vdi: XvaVdi; userdevice: string; device: string; bootable: boolean }[] = [];
  for (const o of objects.values()) {
    const s = o.snapshot;
    if (o.cls !== 'VBD' || s['VM'] !== vmId || str(s['type']).toLowerCase() !== 'disk' || isTrue(s['empty'])) continue;
    const vdi = vdis.find((v) => v.id === s['VDI']);
    if (!vdi) throw new InputError(input, `a disk VBD of the VM refers to ${JSON.stringify(str(s['VDI']))}, which is no VDI in ova.xml`);
    disks.push({ vdi, userdevice: str(s['userdevice']), device: str(s['device']), bootable: isTrue(s['bootable']) });
  }
  const one = <T>(items: T[]): T | undefined => (items.length === 1 ? items[0] : undefined);
  const root = one(disks.filter((d) => d.userdevice === '0')) ?? one(disks.filter((d) => d.device === 'xvda')) ?? one(disks.filter((d) => d.bootable)) ?? one(disks);
  if (!root) {
    throw new InputError(input, disks.length === 0
      ? 'the VM has no disk (no VBD of type Disk with a VDI)'
      : `the VM has ${disks.length} disks and no single one has userdevice 0, device xvda or is bootable: no root disk`);
  }
  return {
    version: 2,
    ...(exportVsn !== undefined ? { exportVsn } : {}),
    vmName: str(vm.snapshot['name_label']),
    vdis,
    rootVdi: root.vdi,
    rootUserdevice: root.userdevice,
  };
}

function cstr(buf: Buffer, start: number, len: number): Buffer {
  const end = buf.indexOf(0, start);
  return buf.subarray(start, end === -1 || end > start + len ? start + len : end);
}

function isZero(buf: Buffer): boolean {
  for (const b of buf) if (b !== 0) return false;
  return true;
}

/** A ustar numeric field: octal text, or GNU base-256 when the high bit is set. */
function tarNumber(block: Buffer, start: number, len: number, what: string, at: number, input: string): number {
  let v: number;
  if (block[start]! & 0x80) {
    let n = BigInt(block[start]! & 0x7f);
    for (let i = 1; i < len; i++) n = (n << 8n) | BigInt(block[start + i]!);
    v = n <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(n) : -1;
  } else {
    const text = cstr(block, start, len).toString('latin1').trim();
    v = /^[0-7]{0,22}$/.test(text) ? (text === '' ? 0 : parseInt(text, 8)) : -1;
  }
  if (!Number.isSafeInteger(v) || v < 0) throw new InputError(input, `tar header at byte ${at}: ${what} field ${JSON.stringify(cstr(block, start, len).toString('latin1'))} is not a number`);
  return v;
}

/** Type flags an XVA may hold: files, directories and the extended headers that name them. */
const FILE_FLAGS = new Set(['0', '\0', '7']);

/**
 * Index a tar in one pass over its headers, seeking over the data: each entry's name, type, and
 * where its data lies. A tar that ends early or lacks its end-of-archive marker is refused.
 */
export async function indexTar(src: Source, input: string): Promise<TarMember[]> {
  const members: TarMember[] = [];
  let pos = 0;
  let pax = new Map<string, Buffer>();
  let longName: Buffer | undefined;
  for (;;) {
    if (pos + TAR_BLOCK > src.size) {
      throw new InputError(input, pos === src.size ? `the tar ends at byte ${pos} without an end-of-archive marker: truncated` : `the tar ends inside a header at byte ${pos}: truncated`);
    }
    const block = await src.read(pos, TAR_BLOCK);
    if (isZero(block)) return members;
    let sum = 0;
    for (let i = 0; i < TAR_BLOCK; i++) sum += i >= 148 && i < 156 ? 32 : block[i]!;
    if (sum !== tarNumber(block, 148, 8, 'checksum', pos, input)) throw new InputError(input, `tar header checksum mismatch at byte ${pos}`);
    const typeflag = String.fromCharCode(block[156]!);
    let name = cstr(block, 0, 100);
    if (block.toString('latin1', 257, 262) === 'ustar' && block[345]) name = Buffer.concat([cstr(block, 345, 155), Buffer.from('/'), name]);
    let size = tarNumber(block, 124, 12, 'size', pos, input);
    const dataOffset = pos + TAR_BLOCK;
    const isRecord = typeflag === 'x' || typeflag === 'g' || typeflag === 'L';
    if (!isRecord) {
      const paxSize = pax.get('size')?.toString('latin1');
      if (paxSize !== undefined) {
        if (!/^[0-9]{1,16}$/.test(paxSize)) throw new InputError(input, `tar entry at byte ${pos}: pax size ${JSON.stringify(paxSize)} is not a number`);
        size = Number(paxSize);
      }
      name = pax.get('path') ?? longName ?? name;
      if (!FILE_FLAGS.has(typeflag) && typeflag !== '5') {
        throw new InputError(input, `tar entry ${JSON.stringify(normalizeTarPath(name).toString('utf8'))} has type ${JSON.stringify(typeflag)}: an XVA holds only files and directories`);
      }
      if (typeflag === '5') size = 0;
    } else if (size > TAR_RECORD_LIMIT) {
      throw new InputError(input, `tar extended header at byte ${pos} holds ${size} bytes, more than the ${TAR_RECORD_LIMIT} an XVA's names need`);
    }
    if (dataOffset + size > src.size) {
      throw new InputError(input, `tar entry at byte ${pos} holds ${size} bytes, which run past the end of the ${src.size}-byte file: truncated`);
    }
    if (typeflag === 'x') pax = new Map([...pax, ...decodePaxRecords(await src.read(dataOffset, size), input)]);
    else if (typeflag === 'L') longName = cstr(await src.read(dataOffset, size), 0, size);
    else if (typeflag !== 'g') {
      members.push({ name: normalizeTarPath(name).toString('utf8'), typeflag, dataOffset, size });
      pax = new Map();
      longName = undefined;
    }
    pos = dataOffset + Math.ceil(size / TAR_BLOCK) * TAR_BLOCK;
  }
}

function listed(names: string[]): string {
  const shown = names.slice(0, MAX_LISTED).map((n) => JSON.stringify(n)).join(', ');
  return names.length > MAX_LISTED ? `${shown} and ${names.length - MAX_LISTED} more` : shown;
}

const BLOCK_NAME = /^(.+)\/([0-9]{8,15})(\.checksum|\.xxhash)?$/;

/**
 * Lay out every VDI directory of the tar: blocks placed by counter, each with exactly one checksum
 * sibling. Anything in the tar that is not ova.xml, a VDI's directory, block or checksum is refused.
 * `input` names the .xva; a block's problems name it as "FILE.xva:Ref:3/00000042".
 */
export function xvaLayout(members: TarMember[], ova: XvaOva, input: string): Map<string, XvaDiskLayout> {
  const vdis = new Map(ova.vdis.map((v) => [v.id, v]));
  const blocks = new Map<string, Map<number, TarMember>>();
  const sums = new Map<string, Map<number, { kind: ChecksumKind; member: TarMember }[]>>();
  const outside: string[] = [];
  for (const m of members) {
    if (m.name === OVA_XML && FILE_FLAGS.has(m.typeflag)) continue;
    if (m.typeflag === '5') {
      if (!vdis.has(m.name)) outside.push(`${m.name}/`);
      continue;
    }
    const match = BLOCK_NAME.exec(m.name);
    if (!match || !vdis.has(match[1]!)) {
      outside.push(m.name);
      continue;
    }
    const [, vdi, digits, suffix] = match as unknown as [string, string, string, string | undefined];
    const counter = Number(digits);
    if (suffix) {
      const kind: ChecksumKind = suffix === '.checksum' ? 'sha1' : 'xxhash';
      const byCounter = sums.get(vdi) ?? new Map<number, { kind: ChecksumKind; member: TarMember }[]>();
      sums.set(vdi, byCounter);
      byCounter.set(counter, [...(byCounter.get(counter) ?? []), { kind, member: m }]);
    } else {
      const byCounter = blocks.get(vdi) ?? new Map<number, TarMember>();
      blocks.set(vdi, byCounter);
      const other = byCounter.get(counter);
      if (other) throw new InputError(`${input}:${m.name}`, `duplicate block: number ${counter} is in the tar twice${other.name === m.name ? '' : ` (also as ${JSON.stringify(other.name)})`}`);
      byCounter.set(counter, m);
    }
  }
  if (outside.length > 0) {
    throw new InputError(input, `tar entries outside the XVA layout (ova.xml, and VDI/NNNNNNNN blocks with .checksum or .xxhash siblings): ${listed(outside)}`);
  }

  const layouts = new Map<string, XvaDiskLayout>();
  for (const vdi of ova.vdis) {
    const byCounter = blocks.get(vdi.id) ?? new Map<number, TarMember>();
    const checks = sums.get(vdi.id) ?? new Map<number, { kind: ChecksumKind; member: TarMember }[]>();
    for (const [counter, list] of checks) {
      if (!byCounter.has(counter)) throw new InputError(`${input}:${list[0]!.member.name}`, 'is the checksum of a block that is not in the tar');
    }
    if (byCounter.size === 0) {
      if (vdi === ova.rootVdi) throw new InputError(input, `no blocks for the root disk ${vdi.id} in the tar`);
      continue;
    }
    const layout: XvaDiskLayout = { vdi, blocks: [], leftOut: 0, keepAlive: 0, checksums: [] };
    let offset = 0;
    let previous = -1;
    for (const [counter, m] of [...byCounter].sort((a, b) => a[0] - b[0])) {
      const where = `${input}:${m.name}`;
      const list = checks.get(counter) ?? [];
      if (list.length === 0) throw new InputError(where, 'has no .checksum (SHA-1) or .xxhash sibling: the block cannot be verified');
      if (list.length > 1) throw new InputError(where, `has ${list.length} checksum siblings: ${listed(list.map((c) => c.member.name))}`);
      const { kind, member } = list[0]!;
      const spec = CHECKSUMS[kind];
      if (member.typeflag === '5' || member.size !== spec.hexDigits) {
        throw new InputError(`${input}:${member.name}`, `holds ${member.size} bytes; a ${spec.what} ${spec.suffix} file holds ${spec.hexDigits} hex digits`);
      }
      if (previous === -1 && counter !== 0) throw new InputError(`${input}:${vdi.id}`, 'has no block 00000000: XAPI and Xen Orchestra always write the first block');
      layout.leftOut += counter - previous - 1;
      offset += (counter - previous - 1) * BLOCK_SIZE;
      if (offset >= vdi.virtualSize) throw new InputError(where, `starts at byte ${offset}, beyond the ${vdi.virtualSize}-byte disk (virtual_size in ova.xml)`);
      if (m.size === 0) layout.keepAlive++;
      else if (m.size !== BLOCK_SIZE && offset + m.size !== vdi.virtualSize) {
        throw new InputError(where, `holds ${m.size} bytes; a block holds ${BLOCK_SIZE} (1 MiB), or 0 (a keep-alive), or the rest of the disk when it is the last one`);
      }
      layout.blocks.push({ counter, name: m.name, offset, length: m.size, dataOffset: m.dataOffset, checksum: { kind, dataOffset: member.dataOffset } });
      if (!layout.checksums.includes(kind)) layout.checksums.push(kind);
      offset += m.size;
      previous = counter;
    }
    if (offset < vdi.virtualSize) {
      throw new InputError(`${input}:${vdi.id}`, `the blocks end at byte ${offset} of the ${vdi.virtualSize}-byte disk: the last block, which XAPI always writes to mark the disk's end, is missing (a truncated export?)`);
    }
    layouts.set(vdi.id, layout);
  }
  return layouts;
}

let xxh64: ReturnType<typeof xxhash> | undefined;

/** The checksum as its producer prints it: SHA-1 in lower case, XXH64 as XAPI's "%016LX". */
async function digest(kind: ChecksumKind, data: Buffer): Promise<string> {
  if (kind === 'sha1') return createHash('sha1').update(data).digest('hex');
  const api = await (xxh64 ??= xxhash());
  return api.h64Raw(data).toString(16).padStart(16, '0').toUpperCase();
}

/**
 * The disk of an XVA as a Source over the .xva itself: a read is served from the blocks' bytes in
 * the tar, zeros where blocks were left out. Each block is checked against its checksum the first
 * time any of its bytes is read, so no unverified byte ever leaves; a mismatch is an InputError
 * naming the block. Closing leaves the .xva open: it belongs to the caller.
 */
export class XvaDisk implements Source {
  readonly name: string;
  readonly size: number;
  /** Blocks holding data, in disk order. */
  readonly dataBlocks: readonly XvaBlock[];
  private readonly verified: Uint8Array;
  private readonly pending = new Map<number, Promise<Buffer>>();

  constructor(
    private readonly xva: Source,
    private readonly input: string,
    layout: XvaDiskLayout,
  ) {
    this.name = `${input}:${layout.vdi.id}`;
    this.size = layout.vdi.virtualSize;
    this.dataBlocks = layout.blocks.filter((b) => b.length > 0);
    this.verified = new Uint8Array(this.dataBlocks.length);
  }

  /** Index of the first data block ending after `position`. */
  private find(position: number): number {
    let lo = 0;
    let hi = this.dataBlocks.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      const b = this.dataBlocks[mid]!;
      if (b.offset + b.length <= position) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  async read(position: number, length: number): Promise<Buffer> {
    checkReadRange(this, position, length);
    const out = Buffer.alloc(length);
    const end = position + length;
    for (let i = this.find(position); i < this.dataBlocks.length; i++) {
      const b = this.dataBlocks[i]!;
      if (b.offset >= end) break;
      const from = Math.max(position, b.offset);
      const to = Math.min(end, b.offset + b.length);
      const whole = this.verified[i] ? undefined : await this.verify(i);
      if (whole) whole.copy(out, from - position, from - b.offset, to - b.offset);
      else (await this.xva.read(b.dataOffset + from - b.offset, to - from)).copy(out, from - position);
    }
    return out;
  }

  /** Read block i whole and check it, once even when reads of it overlap. */
  private verify(i: number): Promise<Buffer> {
    let p = this.pending.get(i);
    if (!p) {
      p = this.check(this.dataBlocks[i]!).then((data) => {
        this.verified[i] = 1;
        return data;
      });
      p.then(() => this.pending.delete(i), () => this.pending.delete(i));
      this.pending.set(i, p);
    }
    return p;
  }

  private async check(b: XvaBlock): Promise<Buffer> {
    const spec = CHECKSUMS[b.checksum.kind];
    const data = await this.xva.read(b.dataOffset, b.length);
    const stored = (await this.xva.read(b.checksum.dataOffset, spec.hexDigits)).toString('latin1');
    if (!/^[0-9a-fA-F]*$/.test(stored)) throw new InputError(`${this.input}:${b.name}${spec.suffix}`, `is not ${spec.hexDigits} hex digits: ${JSON.stringify(stored)}`);
    const actual = await digest(b.checksum.kind, data);
    if (actual.toLowerCase() !== stored.toLowerCase()) {
      throw new InputError(`${this.input}:${b.name}`, `${spec.what} checksum mismatch: ${b.name}${spec.suffix} says ${stored}, the block's ${b.length} bytes hash to ${actual}`);
    }
    return data;
  }

  async close(): Promise<void> {}
}

export interface OpenedXva {
  ova: XvaOva;
  /** The root disk's layout. */
  layout: XvaDiskLayout;
  disk: XvaDisk;
}

/** Index an .xva, parse its ova.xml and lay out its disks; the root disk as a verifying Source. */
export async function openXva(src: Source, input: string = src.name): Promise<OpenedXva> {
  const members = await indexTar(src, input);
  const ovas = members.filter((m) => m.name === OVA_XML);
  if (ovas.length === 0) throw new InputError(input, 'no ova.xml in the tar: not an XVA');
  if (ovas.length > 1) throw new InputError(input, `${ovas.length} ova.xml entries in the tar`);
  const m = ovas[0]!;
  if (!FILE_FLAGS.has(m.typeflag)) throw new InputError(input, 'ova.xml is a directory');
  if (m.size > OVA_XML_LIMIT) throw new InputError(`${input}:${OVA_XML}`, `holds ${m.size} bytes, more than the ${OVA_XML_LIMIT} an ova.xml may`);
  const ova = parseXvaOvaXml(await src.read(m.dataOffset, m.size), `${input}:${OVA_XML}`);
  const layout = xvaLayout(members, ova, input).get(ova.rootVdi.id)!;
  return { ova, layout, disk: new XvaDisk(src, input, layout) };
}

/**
 * XAPI exports an XVA gzip- or zstd-compressed on request. Such a file cannot be read in place, so
 * it is refused by name (with how to decompress it) rather than as an unknown format.
 */
export async function refuseCompressedXva(src: Source): Promise<void> {
  if (src.size < 4) return;
  const head = await src.read(0, Math.min(src.size, 1024));
  if (head[0] === 0x1f && head[1] === 0x8b) {
    let inner = Buffer.alloc(0);
    try {
      // The first KiB of the stream holds the first tar header, uncompressed to at most 1 MiB.
      inner = gunzipSync(head, { finishFlush: zlibConstants.Z_SYNC_FLUSH });
    } catch {
      // not even the start of a readable gzip stream: said below without the XVA guess
    }
    const xva = inner.length >= TAR_BLOCK && inner.toString('latin1', 257, 262) === 'ustar' && cstr(inner, 0, 100).toString('latin1') === OVA_XML;
    throw new InputError(src.name, xva
      ? 'a gzip-compressed XVA (an export with compression): decompress it first (gunzip); blocks are read in place, which a compressed stream does not allow'
      : 'gzip-compressed: decompress it first (gunzip)');
  }
  if (head.readUInt32LE(0) === 0xfd2fb528) {
    throw new InputError(src.name, 'zstd-compressed (as XAPI compresses an XVA export): decompress it first (zstd -d); blocks are read in place, which a compressed stream does not allow');
  }
}
