import { link, mkdir, open, readFile, symlink, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Readable } from 'node:stream';
import { Worker } from 'node:worker_threads';
import { crc32 } from 'node:zlib';
import { execa } from 'execa';
import { CancelledError, InputError } from '../../src/errors.js';
import { detectSource } from '../../src/formats/detect.js';
import { ExtFileSystem } from '../../src/formats/ext/index.js';
import { Iso9660 } from '../../src/formats/iso9660.js';
import { chooseRootPartition, partitionSource, readPartitionTable } from '../../src/formats/partitions.js';
import type { Source } from '../../src/formats/source.js';
import { packTree, readTar, type TreeEntry } from '../../src/formats/tar.js';
import { detectVhd, openVhd, vhdInfo } from '../../src/formats/vhd.js';
import { chunkLayout, parseOvaXml } from '../../src/formats/xva.js';
import { openXva, parseXvaOvaXml } from '../../src/formats/xva2.js';
import { aclValue } from './extfixtures.js';

/**
 * Structure-aware fuzzing of the format readers. Small images made by real tools are kept in
 * memory; each case copies nothing but a few patches over one of them (a field set to an
 * edge value or to a pointer at another structure, bit flips, random bytes, copies, swaps, a
 * truncation), runs a pipeline over it and classifies the outcome: success or an InputError
 * naming the input are fine; anything else (another error, a read outside the image, no result
 * in time) is a finding. Cases are reproducible from (seed, case number, target).
 */

const C = { env: { LC_ALL: 'C', PAGER: '__none__', DEBUGFS_PAGER: '__none__', SOURCE_DATE_EPOCH: '1500000000' } };

// ---------------------------------------------------------------------------------------------
// Random numbers

/** mulberry32: tiny, fast, and good enough to pick mutations. */
export class Rng {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0;
  }
  u32(): number {
    let t = (this.s = (this.s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }
  /** 0 ≤ result < n, for n up to 2^53. */
  int(n: number): number {
    return Math.floor(((this.u32() * 2 ** 21 + (this.u32() >>> 11)) / 2 ** 53) * n);
  }
  chance(p: number): boolean {
    return this.u32() / 2 ** 32 < p;
  }
  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)]!;
  }
  bytes(n: number): Buffer {
    const b = Buffer.alloc(n);
    for (let i = 0; i < n; i++) b[i] = this.u32() & 0xff;
    return b;
  }
}

/** Each case has its own generator, so any case can be replayed without running the others. */
export function caseRng(seed: number, index: number): Rng {
  let h = Math.imul((seed ^ 0x9e3779b9) >>> 0, 0x85ebca6b) ^ Math.imul(index + 1, 0xc2b2ae35);
  h ^= h >>> 16;
  h = Math.imul(h, 0x7feb352d);
  h ^= h >>> 15;
  return new Rng(h);
}

// ---------------------------------------------------------------------------------------------
// The mutated image and the Source over it

/** A base image plus byte patches and a possibly shorter size: mutating copies no image. */
export class Image {
  size: number;
  private patches: { at: number; bytes: Buffer }[] = [];
  constructor(private base: Buffer) {
    this.size = base.length;
  }
  get(at: number, length: number): Buffer {
    const out = Buffer.alloc(Math.max(0, Math.min(length, this.size - at)));
    if (out.length === 0) return out;
    this.base.copy(out, 0, at, Math.min(at + out.length, this.base.length));
    for (const p of this.patches) {
      const from = Math.max(at, p.at);
      const to = Math.min(at + out.length, p.at + p.bytes.length);
      if (from < to) p.bytes.copy(out, from - at, from - p.at, to - p.at);
    }
    return out;
  }
  set(at: number, bytes: Buffer): void {
    const end = Math.min(this.size, at + bytes.length);
    if (at < 0 || at >= end) return;
    this.patches.push({ at, bytes: Buffer.from(bytes.subarray(0, end - at)) });
  }
  truncate(size: number): void {
    this.size = Math.max(0, Math.min(this.size, size));
  }
  /** Replace the whole content (text targets change length). */
  replace(bytes: Buffer): void {
    this.base = bytes;
    this.size = bytes.length;
    this.patches = [];
  }
  bytes(): Buffer {
    return this.get(0, this.size);
  }
}

/** Thrown by MemorySource when a reader asks for bytes outside the image: a reader bug. */
export class OutsideImageRead extends Error {
  override name = 'OutsideImageRead';
}

/** Per-case bound on bytes read from the image: far above any honest pipeline over these images. */
const READ_CAP = 1 << 30;

export class MemorySource implements Source {
  readonly size: number;
  private bytesRead = 0;
  constructor(
    readonly name: string,
    private readonly img: Image,
    private readonly signal?: AbortSignal,
  ) {
    this.size = img.size;
  }
  async read(position: number, length: number): Promise<Buffer> {
    // A macrotask per read, like real I/O: an endless loop of reads still lets timers fire.
    await new Promise((resolve) => setImmediate(resolve));
    if (this.signal?.aborted) throw new CancelledError('fuzz case stopped');
    if (!Number.isSafeInteger(position) || !Number.isSafeInteger(length) || position < 0 || length < 0 || position + length > this.size) {
      throw new OutsideImageRead(`${this.name}: read of ${length} bytes at offset ${position} is outside the ${this.size}-byte image`);
    }
    this.bytesRead += length;
    if (this.bytesRead > READ_CAP) throw new Error(`${this.name}: more than ${READ_CAP} bytes read in one case (reading in circles?)`);
    return this.img.get(position, length);
  }
  async close(): Promise<void> {}
}

// ---------------------------------------------------------------------------------------------
// Structures, fields and targets

/** What a numeric field counts, so that it can be pointed at another structure. */
export type Unit = 'block' | 'sector' | 'byte' | 'inode' | 'isoblock';

export interface Field {
  name: string;
  /** Offset in the region. */
  off: number;
  width: 1 | 2 | 4 | 8;
  be?: boolean;
  unit?: Unit;
  /** A tar header's octal text field of `width` bytes (may be up to 12). */
  octal?: number;
}

export interface Region {
  kind: string;
  start: number;
  length: number;
  fields: Field[];
}

export interface CaseContext {
  signal: AbortSignal;
  /** Set when the output cap was reached and the case stopped on purpose. */
  capped: boolean;
  cap: number;
  stop(): void;
}

export interface Target {
  /** "ext4-4k/inode": the image and the kind of structure mutated. */
  name: string;
  /** The Source's name; every InputError must name it. */
  input: string;
  base: Buffer;
  /** Structures to mutate. */
  regions: Region[];
  /** Every structure of the image, for copies across kinds. */
  all: Region[];
  pointers: Partial<Record<Unit, number[]>>;
  /** Mutate as text rather than by region. */
  text?: boolean;
  /** Before the mutations, e.g. break the primary GPT so that the backup is read. */
  prepare?: (rng: Rng, img: Image, log: string[]) => void;
  /** Recompute checksums over the mutated bytes, so the mutation reaches the code behind them. */
  fix?: (img: Image) => void;
  run(src: Source, ctx: CaseContext): Promise<void>;
}

function readUInt(img: Image, at: number, width: number, be = false): bigint {
  const b = img.get(at, width);
  if (b.length < width) return 0n;
  let v = 0n;
  for (let i = 0; i < width; i++) v = (v << 8n) | BigInt(b[be ? i : width - 1 - i]!);
  return v;
}

function writeUInt(img: Image, at: number, width: number, value: bigint, be = false): void {
  const b = Buffer.alloc(width);
  let v = BigInt.asUintN(width * 8, value);
  for (let i = 0; i < width; i++) {
    b[be ? width - 1 - i : i] = Number(v & 0xffn);
    v >>= 8n;
  }
  img.set(at, b);
}

function edgeValue(rng: Rng, f: Field, old: bigint, t: Target): bigint {
  const bits = BigInt(f.width * 8);
  const max = (1n << bits) - 1n;
  const pool = f.unit ? t.pointers[f.unit] : undefined;
  switch (rng.int(12)) {
    case 0: return 0n;
    case 1: return 1n;
    case 2: return BigInt(2 + rng.int(15));
    case 3: return max;
    case 4: return max - BigInt(rng.int(4));
    case 5: return 1n << (bits - 1n);
    case 6: return old + BigInt(1 + rng.int(3));
    case 7: return old - BigInt(1 + rng.int(3));
    case 8: return old ^ (1n << BigInt(rng.int(f.width * 8)));
    case 9: return old * 2n + BigInt(rng.int(2));
    case 10: return BigInt(rng.int(2 ** Math.min(53, f.width * 8)));
    default:
      // Point it at another structure of the image (or just past one).
      if (pool?.length) return BigInt(rng.pick(pool) + (rng.chance(0.3) ? rng.int(3) - 1 : 0));
      return BigInt(rng.int(2 ** Math.min(32, f.width * 8)));
  }
}

function octalText(rng: Rng, width: number): Buffer {
  const b = Buffer.alloc(width);
  switch (rng.int(7)) {
    case 0: b.write('7'.repeat(width - 1), 'latin1'); break;
    case 1: b.fill(0x20); break;
    case 2: b.write('-1', 'latin1'); break;
    case 3: b.write('8'.repeat(1 + rng.int(width - 1)), 'latin1'); break;
    case 4:
      // GNU base-256: the high bit of the first byte set, the value in the rest.
      rng.bytes(width).copy(b);
      b[0] = b[0]! | 0x80;
      break;
    case 5: b.write(rng.int(2 ** 32).toString(8).padStart(width - 1, '0').slice(-(width - 1)), 'latin1'); break;
    default: b.write(String(rng.int(20)), 'latin1');
  }
  return b;
}

type Op = 'field' | 'bitflip' | 'bytes' | 'zero' | 'fill' | 'copy' | 'swap' | 'truncate';
const OPS: [Op, number][] = [['field', 40], ['bitflip', 14], ['bytes', 14], ['zero', 6], ['fill', 3], ['copy', 9], ['swap', 6], ['truncate', 5]];
const OP_TOTAL = OPS.reduce((s, [, w]) => s + w, 0);

function pickOp(rng: Rng): Op {
  let n = rng.int(OP_TOTAL);
  for (const [op, w] of OPS) if ((n -= w) < 0) return op;
  return 'bytes';
}

function subRange(rng: Rng, r: Region): [number, number] {
  if (rng.chance(0.3)) return [r.start, r.length];
  const off = rng.int(r.length);
  return [r.start + off, 1 + rng.int(Math.min(64, r.length - off))];
}

function mutateRegion(rng: Rng, t: Target, img: Image, log: string[]): void {
  const r = rng.pick(t.regions);
  let op = pickOp(rng);
  if (op === 'field' && r.fields.length === 0) op = 'bytes';
  const where = `${r.kind}@${r.start}`;
  switch (op) {
    case 'field': {
      const f = rng.pick(r.fields);
      const at = r.start + f.off;
      if (f.octal) {
        const text = octalText(rng, f.octal);
        img.set(at, text);
        log.push(`${where} ${f.name} = ${JSON.stringify(text.toString('latin1'))}`);
      } else {
        const old = readUInt(img, at, f.width, f.be);
        const v = edgeValue(rng, f, old, t);
        writeUInt(img, at, f.width, v, f.be);
        log.push(`${where} ${f.name} ${old} -> ${BigInt.asUintN(f.width * 8, v)}`);
      }
      break;
    }
    case 'bitflip': {
      const n = 1 + rng.int(4);
      for (let i = 0; i < n; i++) {
        const at = r.start + rng.int(r.length);
        const bit = rng.int(8);
        img.set(at, Buffer.from([img.get(at, 1)[0]! ^ (1 << bit)]));
        log.push(`${where} flip byte ${at} bit ${bit}`);
      }
      break;
    }
    case 'bytes': {
      const at = r.start + rng.int(r.length);
      const bytes = rng.bytes(1 + rng.int(8));
      img.set(at, bytes);
      log.push(`${where} bytes ${at} = ${bytes.toString('hex')}`);
      break;
    }
    case 'zero':
    case 'fill': {
      const [at, len] = subRange(rng, r);
      img.set(at, Buffer.alloc(len, op === 'zero' ? 0 : 0xff));
      log.push(`${where} ${op} ${at}+${len}`);
      break;
    }
    case 'copy': {
      const same = t.regions.filter((o) => o.kind === r.kind && o !== r);
      const from = same.length && rng.chance(0.6) ? rng.pick(same) : rng.pick(t.all);
      const len = Math.min(r.length, from.length);
      img.set(r.start, img.get(from.start, len));
      log.push(`${where} copy ${len} bytes from ${from.kind}@${from.start}`);
      break;
    }
    case 'swap': {
      const same = t.regions.filter((o) => o.kind === r.kind && o !== r);
      if (same.length && rng.chance(0.5)) {
        const o = rng.pick(same);
        const len = Math.min(r.length, o.length);
        const a = img.get(r.start, len);
        img.set(r.start, img.get(o.start, len));
        img.set(o.start, a);
        log.push(`${where} swap ${len} bytes with ${o.kind}@${o.start}`);
      } else {
        const w = rng.pick([1, 2, 4, 8, 16]);
        const a = r.start + rng.int(Math.max(1, r.length - w));
        const b = r.start + rng.int(Math.max(1, r.length - w));
        const ab = img.get(a, w);
        img.set(a, img.get(b, w));
        img.set(b, ab);
        log.push(`${where} swap ${w} bytes at ${a} and ${b}`);
      }
      break;
    }
    case 'truncate': {
      const size = rng.chance(0.6) ? r.start + rng.int(r.length + 1) : rng.int(img.size);
      img.truncate(size);
      log.push(`truncate to ${img.size}`);
      break;
    }
  }
}

const XML_TOKENS = [
  '<', '>', '"', "'", '&', '&amp;', '&#0;', '&#xffff;', '/>', '</vm>', '</appliance>', '<vm>', '<vdi/>', '<vbd/>', '<!--', '-->',
  '<![CDATA[', ']]>', '<?xml version="1.0"?>', '\0', '\uFEFF', '\n', ' size="-1"', ' size="99999999999999999999"', ' size="0x10"',
  ' source="file://../etc"', ' source="file:///"', ' type="dir-gzipped-chunks"', ' device="xvda"', ' vdi="vdi_xvda"', ' name="vdi_xvda"',
  '<vbd device="xvda" vdi="nope"/>', '<vdi name="vdi_xvda" size="1" source="file://xvda" type="dir-gzipped-chunks"/>',
  '<!DOCTYPE a [<!ENTITY e "x">]>', '<!DOCTYPE a [<!ENTITY e0 "xxxxxxxxxx"><!ENTITY e1 "&e0;&e0;&e0;&e0;&e0;&e0;&e0;&e0;"><!ENTITY e2 "&e1;&e1;&e1;&e1;&e1;&e1;&e1;&e1;">]>',
  '&e;', '&e2;', 'chunk-000000001.gz', 'chunk-999999999.gz', 'chunk-1.gz', 'CHUNK-000000000.GZ', 'chunk-00000000x.gz',
];

/** Text mutations for ova.xml and the chunk name list: tokens, cuts, repeats, swapped attribute values. */
function mutateText(rng: Rng, img: Image, log: string[]): void {
  let s = img.bytes().toString('latin1');
  const at = () => rng.int(s.length + 1);
  switch (rng.int(9)) {
    case 0: {
      const tok = Buffer.from(rng.pick(XML_TOKENS), 'utf8').toString('latin1');
      const p = at();
      s = s.slice(0, p) + tok + s.slice(p);
      log.push(`insert ${JSON.stringify(tok)} at ${p}`);
      break;
    }
    case 1: {
      const p = at();
      const n = 1 + rng.int(40);
      s = s.slice(0, p) + s.slice(p + n);
      log.push(`delete ${n} at ${p}`);
      break;
    }
    case 2: {
      const p = at();
      const n = 1 + rng.int(200);
      const times = 1 + rng.int(rng.chance(0.1) ? 2000 : 4);
      s = s.slice(0, p) + s.slice(p, p + n).repeat(times + 1) + s.slice(p + n);
      log.push(`repeat ${n} at ${p} ×${times + 1}`);
      break;
    }
    case 3: {
      const values = [...s.matchAll(/"[^"]*"/g)];
      if (values.length === 0) break;
      const m = rng.pick(values);
      const v = rng.pick(['""', '"0"', '"-5"', '"1e3"', '"9007199254740993"', '" 42 "', '"file://"', '"file://a/b"', '"xvda"', `"${'x'.repeat(1000)}"`]);
      s = s.slice(0, m.index) + v + s.slice(m.index + m[0].length);
      log.push(`value at ${m.index} = ${v.slice(0, 20)}`);
      break;
    }
    case 4: {
      const p = at();
      const b = rng.bytes(1 + rng.int(6)).toString('latin1');
      s = s.slice(0, p) + b + s.slice(p + b.length);
      log.push(`bytes at ${p}`);
      break;
    }
    case 5: {
      const a = at();
      const b = at();
      const [x, y] = a < b ? [a, b] : [b, a];
      s = s.slice(0, x) + s.slice(y) + s.slice(x, y);
      log.push(`rotate ${x}..${y}`);
      break;
    }
    case 6: {
      const tags = [...s.matchAll(/<(\/?)([A-Za-z_]+)/g)];
      if (tags.length === 0) break;
      const m = rng.pick(tags);
      const name = rng.pick(['appliance', 'vm', 'vbd', 'vdi', 'label', 'x', '']);
      s = s.slice(0, m.index + 1 + m[1]!.length) + name + s.slice(m.index + m[0].length);
      log.push(`rename <${m[1]}${m[2]}> at ${m.index} to ${name}`);
      break;
    }
    case 7: {
      const elements = [...s.matchAll(/<(appliance|vm|vbd|vdi)\b[\s\S]*?(?:\/>|<\/\1>)/g)];
      if (elements.length === 0) break;
      const m = rng.pick(elements);
      const copies = rng.pick([0, 2, 3]);
      s = s.slice(0, m.index) + m[0].repeat(copies) + s.slice(m.index + m[0].length);
      log.push(`<${m[1]}> at ${m.index} × ${copies}`);
      break;
    }
    default:
      s = s.slice(0, at());
      log.push(`truncate to ${s.length}`);
  }
  img.replace(Buffer.from(s, 'latin1'));
}

// ---------------------------------------------------------------------------------------------
// Running cases

export type OutcomeKind = 'ok' | 'capped' | 'input-error' | 'finding';

export interface CaseResult {
  target: string;
  seed: number;
  index: number;
  kind: OutcomeKind;
  /** The error message (input-error) or what went wrong (finding). */
  message?: string;
  /** The mutations applied, to read a finding without replaying it. */
  log: string[];
  ms: number;
  /** The mutated input, for findings only. */
  input?: Buffer;
}

export interface CaseOptions {
  /** Per-case time budget. */
  caseMs: number;
  /** Bytes of output (tar stream, file data) after which the case stops as a success. */
  cap: number;
}

export const DEFAULT_CASE: CaseOptions = { caseMs: 3000, cap: 64 << 20 };

export function mutate(t: Target, rng: Rng, img: Image): string[] {
  const log: string[] = [];
  t.prepare?.(rng, img, log);
  // Mostly one change, so that each reaches as deep as it can; now and then many at once.
  const n = rng.chance(0.1) ? 4 + rng.int(12) : rng.chance(0.3) ? (rng.chance(0.3) ? 3 : 2) : 1;
  for (let i = 0; i < n; i++) {
    if (t.text) mutateText(rng, img, log);
    else mutateRegion(rng, t, img, log);
  }
  if (t.fix && rng.chance(0.5)) {
    t.fix(img);
    log.push('checksums recomputed');
  }
  return log;
}

/** What a case's error says: nothing (fine) or the finding. */
export function judge(err: unknown, input: string): { kind: OutcomeKind; message: string } {
  if (err instanceof InputError) {
    if (!err.input || !err.input.includes(input) || !err.message.startsWith(`${err.input}: `) || err.message.length <= err.input.length + 2) {
      return { kind: 'finding', message: `InputError does not name the input ${JSON.stringify(input)}: ${err.message}` };
    }
    // eslint-disable-next-line no-control-regex
    if (/[\x00-\x08\x0a-\x1f]/.test(err.message)) return { kind: 'finding', message: `InputError message holds raw control characters: ${JSON.stringify(err.message)}` };
    return { kind: 'input-error', message: err.message };
  }
  if (err instanceof OutsideImageRead) return { kind: 'finding', message: `read outside the image: ${err.message}` };
  const e = err instanceof Error ? err : new Error(String(err));
  return { kind: 'finding', message: `${e.name}: ${e.message}\n${e.stack ?? ''}` };
}

/** Run `t`'s pipeline over `img` under the time budget. */
export async function runOn(t: Target, img: Image, opts: CaseOptions): Promise<{ kind: OutcomeKind; message?: string }> {
  const controller = new AbortController();
  const ctx: CaseContext = {
    signal: controller.signal,
    capped: false,
    cap: opts.cap,
    stop() {
      ctx.capped = true;
      controller.abort();
    },
  };
  const src = new MemorySource(t.input, img, controller.signal);
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<'timeout'>((resolve) => {
    timer = setTimeout(() => resolve('timeout'), opts.caseMs);
  });
  const work = t.run(src, ctx).then(() => 'done' as const);
  work.catch(() => undefined);
  try {
    const r = await Promise.race([work, timeout]);
    if (r === 'timeout') {
      controller.abort();
      return { kind: 'finding', message: `no result within ${opts.caseMs} ms (a hang?)` };
    }
    return { kind: ctx.capped ? 'capped' : 'ok' };
  } catch (err) {
    if (ctx.capped) return { kind: 'capped' };
    return judge(err, t.input);
  } finally {
    clearTimeout(timer);
    controller.abort();
  }
}

export async function runCase(t: Target, seed: number, index: number, opts: CaseOptions = DEFAULT_CASE): Promise<CaseResult> {
  const img = new Image(t.base);
  const log = mutate(t, caseRng(seed, index), img);
  const started = performance.now();
  const outcome = await runOn(t, img, opts);
  const result: CaseResult = { target: t.name, seed, index, log, ms: performance.now() - started, ...outcome };
  if (outcome.kind === 'finding') result.input = img.bytes();
  return result;
}

/**
 * Kills the process when a case keeps the event loop busy past `hangMs` (a synchronous endless
 * loop, which no timer can interrupt), after saying which case it was.
 */
export class Watchdog {
  private readonly state = new Int32Array(new SharedArrayBuffer(12));
  private readonly since = new Float64Array(new SharedArrayBuffer(8));
  private readonly worker: Worker;
  constructor(seed: number, names: string[], hangMs: number, reportFile: string) {
    const code = `
      const { workerData: w } = require('node:worker_threads');
      const fs = require('node:fs');
      const state = new Int32Array(w.state), since = new Float64Array(w.since);
      setInterval(() => {
        if (Atomics.load(state, 0) !== 1 || Date.now() - since[0] < w.hangMs) return;
        const index = Atomics.load(state, 1), target = w.names[Atomics.load(state, 2)];
        const msg = 'fuzz: case ' + index + ' of ' + target + ' (seed ' + w.seed + ') blocked the event loop for ' + w.hangMs +
          ' ms; killing the process. Replay: FUZZ_SEED=' + w.seed + ' FUZZ_TARGET=' + target + ' FUZZ_CASE=' + index + '\\n';
        fs.writeSync(2, msg);
        try { fs.writeFileSync(w.reportFile, msg); } catch {}
        process.kill(process.pid, 'SIGKILL');
      }, 250);`;
    this.worker = new Worker(code, { eval: true, workerData: { state: this.state.buffer, since: this.since.buffer, seed, names, hangMs, reportFile } });
    this.worker.unref();
  }
  start(index: number, target: number): void {
    this.since[0] = Date.now();
    Atomics.store(this.state, 1, index);
    Atomics.store(this.state, 2, target);
    Atomics.store(this.state, 0, 1);
  }
  stop(): void {
    Atomics.store(this.state, 0, 0);
  }
  async close(): Promise<void> {
    await this.worker.terminate();
  }
}

export interface TargetStats {
  cases: number;
  ok: number;
  capped: number;
  inputError: number;
  findings: number;
  ms: number;
}

export interface FuzzReport {
  seed: number;
  cases: number;
  seconds: number;
  maxRssBytes: number;
  perTarget: Map<string, TargetStats>;
  findings: CaseResult[];
}

export interface FuzzOptions extends CaseOptions {
  seed: number;
  /** Stop starting new cases after this long. */
  seconds: number;
  maxCases?: number;
  hangMs: number;
  reportFile: string;
  onFinding?: (f: CaseResult) => Promise<void> | void;
}

/** Round-robin over the targets until the time is up; case i mutates target i mod n. */
export async function fuzz(targets: Target[], opts: FuzzOptions): Promise<FuzzReport> {
  const report: FuzzReport = { seed: opts.seed, cases: 0, seconds: 0, maxRssBytes: 0, perTarget: new Map(), findings: [] };
  for (const t of targets) report.perTarget.set(t.name, { cases: 0, ok: 0, capped: 0, inputError: 0, findings: 0, ms: 0 });
  const dog = new Watchdog(opts.seed, targets.map((t) => t.name), opts.hangMs, opts.reportFile);
  const started = performance.now();
  try {
    for (let i = 0; (opts.maxCases === undefined || i < opts.maxCases) && performance.now() - started < opts.seconds * 1000; i++) {
      const ti = i % targets.length;
      const t = targets[ti]!;
      dog.start(i, ti);
      const r = await runCase(t, opts.seed, i, opts);
      dog.stop();
      const s = report.perTarget.get(t.name)!;
      s.cases++;
      s.ms += r.ms;
      if (r.kind === 'ok') s.ok++;
      else if (r.kind === 'capped') s.capped++;
      else if (r.kind === 'input-error') s.inputError++;
      else {
        s.findings++;
        report.findings.push(r);
        await opts.onFinding?.(r);
      }
      report.cases++;
      if (i % 25 === 0) report.maxRssBytes = Math.max(report.maxRssBytes, process.memoryUsage.rss());
    }
  } finally {
    dog.stop();
    await dog.close();
  }
  report.maxRssBytes = Math.max(report.maxRssBytes, process.memoryUsage.rss());
  report.seconds = (performance.now() - started) / 1000;
  return report;
}

export function formatReport(r: FuzzReport): string {
  const pad = (s: string | number, n: number) => String(s).padStart(n);
  const name = Math.max(...[...r.perTarget.keys()].map((k) => k.length));
  const lines = [`seed ${r.seed}: ${r.cases} cases in ${r.seconds.toFixed(1)} s, max RSS ${(r.maxRssBytes / 2 ** 20).toFixed(0)} MiB, ${r.findings.length} findings`];
  lines.push(`${'target'.padEnd(name)} ${pad('cases', 6)} ${pad('ok', 6)} ${pad('capped', 6)} ${pad('input', 6)} ${pad('other', 6)} ${pad('ms/case', 8)}`);
  for (const [k, s] of r.perTarget) {
    const ms = s.cases ? (s.ms / s.cases).toFixed(1) : '-';
    lines.push(`${k.padEnd(name)} ${pad(s.cases, 6)} ${pad(s.ok, 6)} ${pad(s.capped, 6)} ${pad(s.inputError, 6)} ${pad(s.findings, 6)} ${pad(ms, 8)}`);
  }
  return lines.join('\n');
}

/** File name of a regression fixture: the target (with "/" as "~"), seed and case. */
export function regressionName(f: { target: string; seed: number; index: number }): string {
  return `${f.target.replace(/\//g, '~')}--s${f.seed}-c${f.index}.gz`;
}

export function targetOfRegression(file: string): string {
  return file.replace(/--.*$/, '').replace(/~/g, '/');
}

// ---------------------------------------------------------------------------------------------
// Pipelines: what each target runs over a mutated input

async function drain(stream: AsyncIterable<Buffer>, ctx: CaseContext, seen = { bytes: 0 }): Promise<void> {
  for await (const chunk of stream) {
    seen.bytes += chunk.length;
    if (seen.bytes > ctx.cap) {
      ctx.stop();
      return;
    }
  }
}

const LOOKUPS = ['etc/os-release', 'links/fast', 'links/up/a/b/c/d/leaf.txt', 'xattrs/big', 'inline/dir/two'];

/** The export stage over an ext file system: walk, pack every file into a tar, drain it; then lookups. */
async function extPipeline(src: Source, ctx: CaseContext): Promise<void> {
  const { signal } = ctx;
  const fs = await ExtFileSystem.open(src);
  const packed = packTree(fs.walk({ signal }), (e) => fs.readFile(e, { signal }), { signal, input: src.name });
  const seen = { bytes: 0 };
  await drain(packed.stream, ctx, seen);
  if (ctx.capped) {
    packed.stream.destroy();
    return;
  }
  await packed.done;
  for (const p of LOOKUPS) {
    const e = await fs.lookup(p, { follow: true });
    if (e?.type === 'file') await drain(fs.readFile(e, { signal }), ctx, seen);
    if (ctx.capped) return;
  }
  // A symlink loop: an InputError even unmutated, and only another kind of error counts.
  await fs.lookup('links/loop-a', { follow: true }).catch((err: unknown) => {
    if (judge(err, src.name).kind !== 'input-error') throw err;
  });
}

/** The map and export stages over a disk: partition table, the root partition chosen by probing, its tree. */
async function diskPipeline(disk: Source, ctx: CaseContext): Promise<void> {
  await detectSource(disk);
  const table = await readPartitionTable(disk);
  const probe = async (p: Parameters<typeof partitionSource>[1]) => {
    const fs = await ExtFileSystem.open(partitionSource(disk, p));
    return (await fs.lookup('etc/os-release')) !== undefined;
  };
  const root = await chooseRootPartition(table.partitions, probe, 'auto', disk.name);
  await extPipeline(partitionSource(disk, root), ctx);
}

/** The convert stage (VHD → virtual disk), then the disk pipeline over the virtual disk. */
async function vhdPipeline(file: Source, ctx: CaseContext): Promise<void> {
  await detectVhd(file);
  await vhdInfo(file);
  const vhd = await openVhd(file);
  let end = 0;
  for await (const r of vhd.allocatedRanges()) {
    if (r.offset < end || r.length <= 0 || r.offset + r.length > vhd.size) {
      throw new Error(`allocatedRanges gave ${r.offset}+${r.length}, outside the ${vhd.size}-byte disk or out of order`);
    }
    end = r.offset + r.length;
  }
  await diskPipeline(vhd, ctx);
}

/** The extract stage over an ISO: every file read, ova.xml parsed, the chunk directory laid out. */
async function isoPipeline(src: Source, ctx: CaseContext): Promise<void> {
  await detectSource(src);
  const iso = await Iso9660.open(src);
  let total = 0;
  for await (const e of iso.walk()) {
    if (e.isDirectory) continue;
    const f = iso.open(e);
    for (let pos = 0; pos < f.size; ) {
      const n = Math.min(1 << 20, f.size - pos);
      await f.read(pos, n);
      pos += n;
      if ((total += n) > ctx.cap) return ctx.stop();
    }
  }
  const ova = await iso.lookup('ddk/ova.xml');
  if (!ova || ova.isDirectory) return;
  const f = iso.open(ova);
  if (f.size > ctx.cap) return ctx.stop();
  const info = parseOvaXml(await f.read(0, f.size), `${src.name}:ddk/ova.xml`);
  const dir = await iso.lookup(`ddk/${info.rootVdi.directory}`);
  if (!dir?.isDirectory) return;
  chunkLayout((await iso.list(dir)).map((e) => e.name), info.rootVdi.size, `${src.name}:ddk/${info.rootVdi.directory}`);
}

/** ova.xml, then after a NUL line the chunk directory's names: parsed and laid out. */
async function xvaPipeline(src: Source): Promise<void> {
  const text = (await src.read(0, src.size)).toString('utf8');
  const cut = text.indexOf('\n\0\n');
  const info = parseOvaXml(cut === -1 ? text : text.slice(0, cut), src.name);
  const names = cut === -1 ? [] : text.slice(cut + 3).split('\n');
  if (names.length) chunkLayout(names, info.rootVdi.size, src.name);
}

/** The extract and decompress stages over an XVA version 2 (tar index, ova.xml, layout, every block checked), then the disk pipeline. */
async function xva2Pipeline(src: Source, ctx: CaseContext): Promise<void> {
  const { disk } = await openXva(src);
  for (const b of disk.dataBlocks) await disk.read(b.offset, Math.min(b.length, disk.size - b.offset));
  await diskPipeline(disk, ctx);
}

async function xva2OvaPipeline(src: Source): Promise<void> {
  parseXvaOvaXml(await src.read(0, src.size), src.name);
}

async function tarPipeline(src: Source, ctx: CaseContext): Promise<void> {
  async function* chunks(): AsyncGenerator<Buffer> {
    for (let pos = 0; pos < src.size; pos += 65536) yield await src.read(pos, Math.min(65536, src.size - pos));
  }
  const seen = { bytes: 0 };
  await readTar(Readable.from(chunks()), src.name, async (_h, data) => {
    if (!ctx.capped) await drain(data, ctx, seen);
  });
}

// ---------------------------------------------------------------------------------------------
// Fixtures: a content tree, ext images, disks, VHDs, an ISO, a tar, ova.xml

/** Compressible, deterministic text, so that saved regression inputs stay small. */
function text(length: number, seed: number): Buffer {
  const lines: string[] = [];
  let n = 0;
  for (let i = 0; n < length; i++) {
    const l = `line ${i} of file ${seed}: the quick brown fox\n`;
    lines.push(l);
    n += l.length;
  }
  return Buffer.from(lines.join('')).subarray(0, length);
}

async function writeAt(path: string, chunks: [number, Buffer][], size?: number, flags = 'w'): Promise<void> {
  const fh = await open(path, flags);
  try {
    for (const [pos, data] of chunks) await fh.write(data, 0, data.length, pos);
    if (size !== undefined) await fh.truncate(size);
  } finally {
    await fh.close();
  }
}

/**
 * A small tree with every structure the ext reader parses: about 260 inodes and 500 KiB of data,
 * or (`full` false, for 64 KiB blocks) a big directory of 20 names and no large files.
 */
async function makeTree(root: string, full = true): Promise<void> {
  const p = (...parts: string[]) => join(root, ...parts);
  for (const d of ['etc', 'files', 'big', 'deep/a/b/c/d', 'links', 'dev', 'xattrs', 'inline/dir']) await mkdir(p(d), { recursive: true });
  await writeFile(p('etc/os-release'), 'NAME="Fuzz Linux"\nID=fuzz\n');
  await writeFile(p('files/small.txt'), 'hello\n');
  for (const n of full ? [3000, 20_000, 300_000] : [3000]) await writeFile(p(`files/text-${n}`), text(n, n));
  // 400 separate extents: an extent tree of depth 1 with two leaves (4 KiB blocks) or of depth 2 (1 KiB).
  if (full) await writeAt(p('files/fragmented'), Array.from({ length: 400 }, (_, i) => [i * 8192, text(1024, i)] as [number, Buffer]));
  await writeAt(p('files/sparse'), [[0, text(4096, 1)]], 1 << 20);
  await writeFile(p('files/empty'), '');
  for (let i = 0; i < (full ? 200 : 20); i++) {
    const name = p('big', `entry-${String(i).padStart(3, '0')}-${'x'.repeat(i % 20)}`);
    if (i % 50 === 0) await mkdir(name);
    else await writeFile(name, i % 10 === 0 ? `${i}\n` : '');
  }
  await writeFile(p('deep/a/b/c/d/leaf.txt'), 'leaf\n');
  await symlink('../files/small.txt', p('links/fast'));
  await symlink('x/'.repeat(60), p('links/slow'));
  await symlink('/etc/os-release', p('links/absolute'));
  await symlink('../deep', p('links/up'));
  await symlink('loop-b', p('links/loop-a'));
  await symlink('loop-a', p('links/loop-b'));
  await writeFile(p('files/hard-a'), 'linked twice\n');
  await link(p('files/hard-a'), p('links/hard-b'));
  await execa('mknod', [p('dev/null'), 'c', '1', '3']);
  await execa('mknod', [p('dev/sda1'), 'b', '8', '1']);
  await execa('mkfifo', [p('dev/fifo')]);
  const setfattr = (path: string, name: string, value: Buffer) => execa('setfattr', ['-n', name, '-v', `0x${value.toString('hex')}`, path]);
  await writeFile(p('xattrs/small'), 'x\n');
  await setfattr(p('xattrs/small'), 'user.a', Buffer.from('tiny'));
  await writeFile(p('xattrs/big'), 'big xattr\n');
  await setfattr(p('xattrs/big'), 'user.big', text(600, 6));
  await setfattr(p('xattrs/big'), 'user.small', Buffer.from('s'));
  await writeFile(p('xattrs/acl'), 'acl\n');
  await setfattr(p('xattrs/acl'), 'system.posix_acl_access', aclValue());
  await writeFile(p('xattrs/many'), 'many\n');
  for (let i = 0; i < 10; i++) await setfattr(p('xattrs/many'), `user.k${i}`, Buffer.from(`value ${i}`));
  await writeFile(p('inline/tiny'), 'ab');
  await writeFile(p('inline/sixty'), text(60, 60));
  for (const n of ['one', 'two', 'three']) await writeFile(p('inline/dir', n), n);
  await execa('find', [root, '-exec', 'touch', '-h', '-d', '@1500000000', '{}', '+']);
}

interface ExtSpec {
  name: string;
  type: 'ext2' | 'ext3' | 'ext4';
  args: string[];
  mib: number;
  /** Made from the small tree. */
  small?: boolean;
  /** Give xattrs/big a value too large for a block, kept in its own inode. */
  eaInode?: boolean;
}

const EXT_SPECS: ExtSpec[] = [
  { name: 'ext2-1k', type: 'ext2', args: ['-b', '1024', '-I', '128', '-g', '1024'], mib: 4 },
  { name: 'ext3-1k', type: 'ext3', args: ['-b', '1024', '-I', '256', '-g', '2048'], mib: 4 },
  { name: 'ext4-4k', type: 'ext4', args: ['-b', '4096', '-I', '256', '-g', '512', '-O', '^has_journal,ea_inode'], mib: 8, eaInode: true },
  { name: 'ext4-inline', type: 'ext4', args: ['-b', '1024', '-I', '256', '-g', '1024', '-O', 'inline_data,meta_bg,^resize_inode,^has_journal'], mib: 4 },
  // rec_len has its own encoding in 64 KiB blocks.
  { name: 'ext4-64k', type: 'ext4', args: ['-b', '65536', '-I', '256', '-O', '^has_journal,^resize_inode'], mib: 8, small: true },
];

const FIXED_UUID = '0f0e0d0c-0b0a-4908-8706-050403020100';

async function makeExt(spec: ExtSpec, tree: string, dir: string): Promise<string> {
  const img = join(dir, `${spec.name}.img`);
  await writeFile(img, '');
  await truncate(img, spec.mib << 20);
  await execa('mke2fs', ['-F', '-q', '-t', spec.type, ...spec.args, '-U', FIXED_UUID, '-E', `hash_seed=${FIXED_UUID},root_owner=0:0`, '-d', tree, img], C);
  if (spec.eaInode) {
    const value = join(dir, 'ea-value');
    await writeFile(value, text(4096, 4096));
    await execa('debugfs', ['-w', '-R', `ea_set -f ${value} /xattrs/big user.huge`, img], C);
  }
  // mke2fs -d writes linear directories; e2fsck -D indexes the big one (htree).
  const fsck = await execa('e2fsck', ['-f', '-y', '-D', img], { ...C, reject: false });
  if (fsck.exitCode !== 0 && fsck.exitCode !== 1) throw new Error(`e2fsck -D ${img} failed (${fsck.exitCode}): ${fsck.stdout}`);
  return img;
}

const SB_FIELDS: Field[] = [
  ['s_inodes_count', 0x0, 4, 'inode'], ['s_blocks_count_lo', 0x4, 4, 'block'], ['s_r_blocks_count_lo', 0x8, 4], ['s_free_blocks_count_lo', 0xc, 4],
  ['s_free_inodes_count', 0x10, 4], ['s_first_data_block', 0x14, 4, 'block'], ['s_log_block_size', 0x18, 4], ['s_log_cluster_size', 0x1c, 4],
  ['s_blocks_per_group', 0x20, 4], ['s_clusters_per_group', 0x24, 4], ['s_inodes_per_group', 0x28, 4], ['s_magic', 0x38, 2], ['s_state', 0x3a, 2],
  ['s_rev_level', 0x4c, 4], ['s_first_ino', 0x54, 4, 'inode'], ['s_inode_size', 0x58, 2], ['s_feature_compat', 0x5c, 4],
  ['s_feature_incompat', 0x60, 4], ['s_feature_ro_compat', 0x64, 4], ['s_volume_name', 0x78, 8], ['s_desc_size', 0xfe, 2],
  ['s_first_meta_bg', 0x104, 4], ['s_blocks_count_hi', 0x150, 4], ['s_min_extra_isize', 0x15c, 2], ['s_log_groups_per_flex', 0x174, 1],
  ['s_backup_bgs[0]', 0x24c, 4], ['s_backup_bgs[1]', 0x250, 4],
].map(([name, off, width, unit]) => ({ name, off, width, unit }) as Field);

function gdtFields(groups: number, descSize: number): Field[] {
  const out: Field[] = [];
  for (let g = 0; g < groups; g++) {
    const o = g * descSize;
    out.push(
      { name: `bg[${g}].bg_block_bitmap_lo`, off: o, width: 4, unit: 'block' }, { name: `bg[${g}].bg_inode_bitmap_lo`, off: o + 4, width: 4, unit: 'block' },
      { name: `bg[${g}].bg_inode_table_lo`, off: o + 8, width: 4, unit: 'block' }, { name: `bg[${g}].bg_flags`, off: o + 0x12, width: 2 },
      { name: `bg[${g}].bg_itable_unused_lo`, off: o + 0x1c, width: 2 },
    );
    if (descSize >= 64) out.push({ name: `bg[${g}].bg_inode_table_hi`, off: o + 0x28, width: 4 });
  }
  return out;
}

const INODE_FIELDS: Field[] = [
  ['i_mode', 0x0, 2], ['i_uid', 0x2, 2], ['i_size_lo', 0x4, 4, 'byte'], ['i_atime', 0x8, 4], ['i_mtime', 0x10, 4], ['i_gid', 0x18, 2],
  ['i_links_count', 0x1a, 2], ['i_blocks_lo', 0x1c, 4], ['i_flags', 0x20, 4], ['i_block[0]', 0x28, 4, 'block'], ['i_block[1]', 0x2c, 4, 'block'],
  ['i_block[12]', 0x58, 4, 'block'], ['i_block[13]', 0x5c, 4, 'block'], ['i_block[14]', 0x60, 4, 'block'], ['i_file_acl_lo', 0x68, 4, 'block'],
  ['i_size_high', 0x6c, 4], ['l_i_blocks_high', 0x74, 2], ['l_i_file_acl_high', 0x76, 2], ['l_i_uid_high', 0x78, 2], ['l_i_gid_high', 0x7a, 2],
].map(([name, off, width, unit]) => ({ name, off, width, unit }) as Field);

const INODE_EXTRA_FIELDS: Field[] = [
  { name: 'i_extra_isize', off: 0x80, width: 2 }, { name: 'i_ctime_extra', off: 0x84, width: 4 }, { name: 'i_mtime_extra', off: 0x88, width: 4 },
];

function extentFields(buf: Buffer): Field[] {
  const out: Field[] = [
    { name: 'eh_magic', off: 0, width: 2 }, { name: 'eh_entries', off: 2, width: 2 }, { name: 'eh_max', off: 4, width: 2 }, { name: 'eh_depth', off: 6, width: 2 },
  ];
  const depth = buf.readUInt16LE(6);
  const n = Math.min(buf.readUInt16LE(2) + 1, Math.floor((buf.length - 12) / 12));
  for (let i = 0; i < n; i++) {
    const o = 12 + i * 12;
    if (depth === 0) {
      out.push({ name: `ee[${i}].ee_block`, off: o, width: 4 }, { name: `ee[${i}].ee_len`, off: o + 4, width: 2 },
        { name: `ee[${i}].ee_start_hi`, off: o + 6, width: 2 }, { name: `ee[${i}].ee_start_lo`, off: o + 8, width: 4, unit: 'block' });
    } else {
      out.push({ name: `ei[${i}].ei_block`, off: o, width: 4 }, { name: `ei[${i}].ei_leaf_lo`, off: o + 4, width: 4, unit: 'block' },
        { name: `ei[${i}].ei_leaf_hi`, off: o + 8, width: 2 });
    }
  }
  return out;
}

function pointerFields(count: number, prefix: string): Field[] {
  return Array.from({ length: count }, (_, i) => ({ name: `${prefix}[${i}]`, off: i * 4, width: 4, unit: 'block' }) as Field);
}

function dirFields(buf: Buffer, base = 0): Field[] {
  const out: Field[] = [];
  for (let off = base; off + 8 <= buf.length; ) {
    out.push({ name: `@${off}.inode`, off, width: 4, unit: 'inode' }, { name: `@${off}.rec_len`, off: off + 4, width: 2 },
      { name: `@${off}.name_len`, off: off + 6, width: 1 }, { name: `@${off}.file_type`, off: off + 7, width: 1 });
    const recLen = buf.readUInt16LE(off + 4);
    if (recLen < 12) break;
    off += recLen;
  }
  return out;
}

function xattrFields(buf: Buffer, first: number, header: Field[]): Field[] {
  const out = [...header];
  for (let off = first; off + 16 <= buf.length && buf.readUInt32LE(off) !== 0; ) {
    out.push({ name: `@${off}.e_name_len`, off, width: 1 }, { name: `@${off}.e_name_index`, off: off + 1, width: 1 },
      { name: `@${off}.e_value_offs`, off: off + 2, width: 2 }, { name: `@${off}.e_value_inum`, off: off + 4, width: 4, unit: 'inode' },
      { name: `@${off}.e_value_size`, off: off + 8, width: 4 });
    off = (off + 16 + buf[off]! + 3) & ~3;
  }
  return out;
}

const XATTR_BLOCK_HEADER_FIELDS: Field[] = [
  { name: 'h_magic', off: 0, width: 4 }, { name: 'h_refcount', off: 4, width: 4 }, { name: 'h_blocks', off: 8, width: 4 },
];

interface DebugfsInode {
  ino: number;
  loc: number;
  flags: number;
  extra: number;
  acl: number;
  /** (label, first block, last block) of each mapping item: "0-11", "IND", "ETB0"… */
  map: { label: string; from: number; to: number }[];
}

/** Inode locations and block maps as debugfs reports them (imap, stat), one process for all. */
async function debugfsInodes(img: string, inos: number[], bs: number): Promise<DebugfsInode[]> {
  const cmds = inos.flatMap((i) => [`imap <${i}>`, `stat <${i}>`]);
  const { stdout } = await execa('debugfs', ['-f', '-', img], { ...C, input: `${cmds.join('\n')}\n` });
  const sections = stdout.split(/^debugfs: /m).slice(1);
  const out: DebugfsInode[] = [];
  for (let k = 0; k < inos.length; k++) {
    const imap = sections[2 * k]!;
    const stat = sections[2 * k + 1]!;
    const m = /located at block (\d+), offset 0x([0-9a-f]+)/.exec(imap);
    if (!m) throw new Error(`debugfs imap <${inos[k]}>: ${imap}`);
    const map: DebugfsInode['map'] = [];
    const mapText = /^(?:BLOCKS|EXTENTS):\n([\s\S]*?)(?:\nTOTAL|$)/m.exec(stat)?.[1] ?? '';
    for (const item of mapText.matchAll(/\(([^)]*)\)(?:\[[^\]]*\])?:(\d+)(?:-(\d+))?/g)) {
      map.push({ label: item[1]!, from: Number(item[2]), to: Number(item[3] ?? item[2]) });
    }
    out.push({
      ino: inos[k]!,
      loc: Number(m[1]) * bs + parseInt(m[2]!, 16),
      flags: parseInt(/Flags: 0x([0-9a-f]+)/.exec(stat)?.[1] ?? '0', 16),
      extra: Number(/Size of extra inode fields: (\d+)/.exec(stat)?.[1] ?? 0),
      acl: Number(/File ACL: (\d+)/.exec(stat)?.[1] ?? 0),
      map,
    });
  }
  return out;
}

const EXTENTS_FL = 0x80000;
const INLINE_DATA_FL = 0x10000000;

function uniquePointers(values: number[]): number[] {
  return [...new Set(values.filter((v) => Number.isSafeInteger(v) && v >= 0))];
}

async function extTargets(spec: ExtSpec, imgPath: string): Promise<Target[]> {
  const base = await readFile(imgPath);
  const input = `${spec.name}.img`;
  const sb = base.subarray(1024, 2048);
  const bs = 1024 << sb.readUInt32LE(0x18);
  const inodeSize = sb.readUInt16LE(0x58);
  const blocks = sb.readUInt32LE(0x4);
  const firstData = sb.readUInt32LE(0x14);
  const groups = Math.ceil((blocks - firstData) / sb.readUInt32LE(0x20));
  const descSize = sb.readUInt32LE(0x60) & 0x80 ? sb.readUInt16LE(0xfe) : 32;
  const regions: Region[] = [
    { kind: 'superblock', start: 1024, length: 1024, fields: SB_FIELDS },
    { kind: 'gdt', start: (firstData + 1) * bs, length: groups * descSize, fields: gdtFields(groups, descSize) },
  ];

  const fs = await ExtFileSystem.open(new MemorySource(input, new Image(base)));
  const entries = new Map<number, string>();
  // Most of the 200 names in big/ are alike: a tenth of their inodes is mutated, not all.
  let bigIndex = 0;
  for await (const e of fs.walk()) {
    if (e.path.toString().startsWith('big/') && bigIndex++ % 10 !== 0) continue;
    entries.set(e.ino, e.type);
  }
  const inodes = await debugfsInodes(imgPath, [...entries.keys()], bs);
  // Inodes holding xattr values (ea_inode) are named by e_value_inum, not by a directory.
  const eaInodes = new Set<number>();
  for (const ino of inodes) {
    const areas = [base.subarray(ino.loc + 128 + ino.extra + 4, ino.loc + inodeSize)];
    if (ino.acl) areas.push(base.subarray(ino.acl * bs + 32, (ino.acl + 1) * bs));
    for (const area of areas) {
      for (let off = 0; off + 16 <= area.length && area.readUInt32LE(off) !== 0; off = (off + 16 + area[off]! + 3) & ~3) {
        const inum = area.readUInt32LE(off + 4);
        if (inum && !entries.has(inum)) eaInodes.add(inum);
      }
    }
  }
  for (const inum of eaInodes) entries.set(inum, 'file');
  inodes.push(...(await debugfsInodes(imgPath, [...eaInodes], bs)));
  const blockPool: number[] = [0, 1, 2, firstData, blocks - 1, blocks, blocks + 1];
  for (const ino of inodes) {
    const type = entries.get(ino.ino)!;
    const raw = base.subarray(ino.loc, ino.loc + inodeSize);
    regions.push({ kind: 'inode', start: ino.loc, length: inodeSize, fields: inodeSize > 128 ? [...INODE_FIELDS, ...INODE_EXTRA_FIELDS] : INODE_FIELDS });
    const iBlock = raw.subarray(0x28, 0x28 + 60);
    const inline = (ino.flags & INLINE_DATA_FL) !== 0;
    const ibodyStart = 128 + ino.extra;
    if (inodeSize > 128 && ino.extra > 0 && ibodyStart + 4 <= inodeSize && raw.readUInt32LE(ibodyStart) === 0xea020000) {
      const area = raw.subarray(ibodyStart);
      regions.push({ kind: 'xattr', start: ino.loc + ibodyStart, length: area.length, fields: xattrFields(area, 4, [{ name: 'magic', off: 0, width: 4 }]) });
    }
    if (ino.acl) {
      const blk = base.subarray(ino.acl * bs, (ino.acl + 1) * bs);
      regions.push({ kind: 'xattr', start: ino.acl * bs, length: bs, fields: xattrFields(blk, 32, XATTR_BLOCK_HEADER_FIELDS) });
      blockPool.push(ino.acl);
    }
    if (inline) {
      if (type === 'directory') regions.push({ kind: 'dir', start: ino.loc + 0x28, length: 60, fields: dirFields(iBlock, 4) });
      else regions.push({ kind: 'mapping', start: ino.loc + 0x28, length: 60, fields: [] });
      continue;
    }
    if (type === 'symlink' && ino.map.length === 0) continue;
    if (type === 'character-device' || type === 'block-device' || type === 'fifo') continue;
    const extents = (ino.flags & EXTENTS_FL) !== 0;
    regions.push({ kind: 'mapping', start: ino.loc + 0x28, length: 60, fields: extents ? extentFields(iBlock) : pointerFields(15, 'i_block') });
    for (const item of ino.map) {
      for (let b = item.from; b <= item.to; b++) {
        blockPool.push(b);
        const blk = base.subarray(b * bs, (b + 1) * bs);
        if (/^ETB/.test(item.label)) regions.push({ kind: 'mapping', start: b * bs, length: bs, fields: extentFields(blk) });
        else if (/IND$/.test(item.label)) regions.push({ kind: 'mapping', start: b * bs, length: bs, fields: pointerFields(bs / 4, item.label) });
        else if (type === 'directory') regions.push({ kind: 'dir', start: b * bs, length: bs, fields: dirFields(blk) });
      }
    }
  }
  for (let g = 0; g < groups; g++) {
    const d = (firstData + 1) * bs + g * descSize;
    blockPool.push(base.readUInt32LE(d), base.readUInt32LE(d + 4), base.readUInt32LE(d + 8));
  }
  const sCount = sb.readUInt32LE(0);
  const inodePool = [0, 1, 2, 7, 8, 11, sCount, sCount + 1, ...entries.keys()];
  const pointers = { block: uniquePointers(blockPool), inode: uniquePointers(inodePool), byte: [0, 1, 59, 60, 61, bs - 1, bs, bs + 1, 1 << 20, 2 ** 31, 2 ** 32 - 1] };
  // "any": mutations of different structures in one case.
  const kinds = ['superblock', 'gdt', 'inode', 'mapping', 'dir', 'xattr', 'any'];
  return kinds.map((kind) => ({
    name: `${spec.name}/${kind}`,
    input,
    base,
    regions: kind === 'any' ? regions : regions.filter((r) => r.kind === kind),
    all: regions,
    pointers,
    run: extPipeline,
  }));
}

const MBR_ENTRY_FIELDS = (base: number, i: number): Field[] => [
  { name: `entry[${i}].boot`, off: base, width: 1 }, { name: `entry[${i}].type`, off: base + 4, width: 1 },
  { name: `entry[${i}].lba`, off: base + 8, width: 4, unit: 'sector' }, { name: `entry[${i}].sectors`, off: base + 12, width: 4, unit: 'sector' },
];

function mbrRegion(kind: string, sector: number, entries: number): Region {
  const fields = Array.from({ length: entries }, (_, i) => MBR_ENTRY_FIELDS(446 + i * 16, i)).flat();
  fields.push({ name: 'signature', off: 510, width: 2 });
  return { kind, start: sector * 512, length: 512, fields };
}

const GPT_HEADER_FIELDS: Field[] = [
  ['Signature', 0, 8], ['Revision', 8, 4], ['HeaderSize', 12, 4], ['HeaderCRC32', 16, 4], ['MyLBA', 24, 8, 'sector'], ['AlternateLBA', 32, 8, 'sector'],
  ['FirstUsableLBA', 40, 8, 'sector'], ['LastUsableLBA', 48, 8, 'sector'], ['PartitionEntryLBA', 72, 8, 'sector'],
  ['NumberOfPartitionEntries', 80, 4], ['SizeOfPartitionEntry', 84, 4], ['PartitionEntryArrayCRC32', 88, 4],
].map(([name, off, width, unit]) => ({ name, off, width, unit }) as Field);

function gptEntryFields(count: number): Field[] {
  return Array.from({ length: count }, (_, i) => [
    { name: `entry[${i}].type`, off: i * 128, width: 8 }, { name: `entry[${i}].StartingLBA`, off: i * 128 + 32, width: 8, unit: 'sector' },
    { name: `entry[${i}].EndingLBA`, off: i * 128 + 40, width: 8, unit: 'sector' }, { name: `entry[${i}].name`, off: i * 128 + 56, width: 8 },
  ] as Field[]).flat();
}

/** Recompute a GPT header's entry array CRC, then its own CRC, where they lie inside the image. */
function fixGptHeader(img: Image, lba: number): void {
  const at = lba * 512;
  if (lba < 0 || at + 512 > img.size) return;
  const h = img.get(at, 512);
  const entryLba = Number(h.readBigUInt64LE(72));
  const bytes = h.readUInt32LE(80) * h.readUInt32LE(84);
  if (bytes <= 8 << 20 && entryLba * 512 + bytes <= img.size) writeUInt(img, at + 88, 4, BigInt(crc32(img.get(entryLba * 512, bytes))));
  const size = h.readUInt32LE(12);
  if (size < 92 || size > 512) return;
  const header = img.get(at, size);
  header.writeUInt32LE(0, 16);
  writeUInt(img, at + 16, 4, BigInt(crc32(header)));
}

function fixGpt(img: Image): void {
  fixGptHeader(img, 1);
  fixGptHeader(img, Math.floor(img.size / 512) - 1);
}

function vhdChecksum(b: Buffer, at: number): number {
  let sum = 0;
  for (let i = 0; i < b.length; i++) if (i < at || i >= at + 4) sum += b[i]!;
  return ~sum >>> 0;
}

/** Recompute the footer checksums (trailing and copy at 0) and the dynamic header's, wherever the footer says it is. */
function fixVhd(img: Image, headerAt?: number): void {
  const footers = [0, img.size - 512].filter((at) => at >= 0 && at + 512 <= img.size && img.get(at, 8).toString('latin1') === 'conectix');
  const headers = new Set<number>(headerAt === undefined ? [] : [headerAt]);
  for (const at of footers) {
    const f = img.get(at, 512);
    writeUInt(img, at + 64, 4, BigInt(vhdChecksum(f, 64)), true);
    const off = Number(f.readBigUInt64BE(16));
    if (Number.isSafeInteger(off)) headers.add(off);
  }
  for (const at of headers) {
    if (at < 0 || at + 1024 > img.size) continue;
    writeUInt(img, at + 36, 4, BigInt(vhdChecksum(img.get(at, 1024), 36)), true);
  }
}

const VHD_FOOTER_FIELDS: Field[] = [
  ['Cookie', 0, 8], ['Features', 8, 4], ['File Format Version', 12, 4], ['Data Offset', 16, 8, 'byte'], ['Original Size', 40, 8, 'byte'],
  ['Current Size', 48, 8, 'byte'], ['Disk Geometry', 56, 4], ['Disk Type', 60, 4], ['Checksum', 64, 4],
].map(([name, off, width, unit]) => ({ name, off, width, unit, be: true }) as Field);

const VHD_HEADER_FIELDS: Field[] = [
  ['Cookie', 0, 8], ['Data Offset', 8, 8, 'byte'], ['Table Offset', 16, 8, 'byte'], ['Header Version', 24, 4], ['Max Table Entries', 28, 4],
  ['Block Size', 32, 4, 'byte'], ['Checksum', 36, 4],
].map(([name, off, width, unit]) => ({ name, off, width, unit, be: true }) as Field);

function isoRecordFields(buf: Buffer, regionOffset: number, withRecords: boolean, withSusp: boolean, skip: number): Field[] {
  const out: Field[] = [];
  for (let pos = 0; pos < buf.length; ) {
    const len = buf[pos]!;
    if (len === 0) {
      pos = (Math.floor((regionOffset + pos) / 2048) + 1) * 2048 - regionOffset;
      continue;
    }
    const r = `@${pos}`;
    if (withRecords) {
      out.push({ name: `${r}.length`, off: pos, width: 1 }, { name: `${r}.extattr`, off: pos + 1, width: 1 },
        { name: `${r}.extent`, off: pos + 2, width: 4, unit: 'isoblock' }, { name: `${r}.dataLength`, off: pos + 10, width: 4, unit: 'byte' },
        { name: `${r}.flags`, off: pos + 25, width: 1 }, { name: `${r}.unitSize`, off: pos + 26, width: 1 }, { name: `${r}.lenFi`, off: pos + 32, width: 1 });
    }
    if (withSusp) {
      const lenFi = buf[pos + 32]!;
      let su = pos + 33 + lenFi + (lenFi % 2 === 0 ? 1 : 0) + skip;
      while (su + 4 <= pos + len) {
        const sig = buf.toString('latin1', su, su + 2);
        const l = buf[su + 2]!;
        if (l < 4) break;
        out.push({ name: `${r}.${sig}.len`, off: su + 2, width: 1 });
        if (sig === 'CE') out.push({ name: `${r}.CE.block`, off: su + 4, width: 4, unit: 'isoblock' }, { name: `${r}.CE.offset`, off: su + 12, width: 4 }, { name: `${r}.CE.length`, off: su + 20, width: 4 });
        if (sig === 'NM') out.push({ name: `${r}.NM.flags`, off: su + 4, width: 1 });
        if (sig === 'PX') out.push({ name: `${r}.PX.mode`, off: su + 4, width: 4 });
        if (sig === 'SP') out.push({ name: `${r}.SP.len_skp`, off: su + 6, width: 1 });
        su += l;
      }
    }
    pos += len;
  }
  return out;
}

const ISO_DESCRIPTOR_FIELDS: Field[] = [
  ['type', 0, 1], ['identifier', 1, 4], ['Volume Space Size', 80, 4, 'isoblock'], ['Logical Block Size', 128, 2], ['Path Table Size', 132, 4],
  ['Root.length', 156, 1], ['Root.extattr', 157, 1], ['Root.extent', 158, 4, 'isoblock'], ['Root.dataLength', 166, 4, 'byte'], ['Root.flags', 181, 1],
  ['escape', 88, 4],
].map(([name, off, width, unit]) => ({ name, off, width, unit }) as Field);

const ISO_VARIANTS = {
  iso: ['-R', '-J', '-rr_reloc_dir', 'rr_moved'],
  'iso-joliet': ['-J'],
  'iso-plain': ['-untranslated-filenames'],
} as const;

async function makeIsoTree(root: string, tree: string): Promise<void> {
  await mkdir(join(root, 'ddk/xvda'), { recursive: true });
  await writeFile(join(root, 'ddk/ova.xml'), OVA_XML);
  await writeFile(join(root, 'ddk/xvda/chunk-000000000.gz'), (await execa('gzip', ['-c', '-n'], { input: text(50_000, 1), encoding: 'buffer' })).stdout);
  await writeFile(join(root, 'ddk/xvda/chunk-000000002.gz'), (await execa('gzip', ['-c', '-n'], { input: text(1000, 2), encoding: 'buffer' })).stdout);
  await writeFile(join(root, 'ddk/xvda/TRANS.TBL'), 'F chunk-000000000.gz;1 chunk-000000000.gz\n');
  await writeFile(join(root, `${'long-name-'.repeat(20)}.txt`), 'long\n');
  let deep = join(root, 'deep');
  for (let i = 0; i < 9; i++) deep = join(deep, `level${i}`);
  await mkdir(deep, { recursive: true });
  await writeFile(join(deep, 'file'), 'deep\n');
  await writeFile(join(root, 'os-release'), await readFile(join(tree, 'etc/os-release')));
  await execa('find', [root, '-exec', 'touch', '-h', '-d', '@1500000000', '{}', '+']);
}

/** An ISO of the DDK-like tree with Rock Ridge and Joliet names, with Joliet only, or with neither. */
async function isoTargets(variant: keyof typeof ISO_VARIANTS, root: string, dir: string): Promise<Target[]> {
  const input = `${variant}.iso`;
  const iso = join(dir, input);
  await execa('xorriso', ['-as', 'mkisofs', '-quiet', ...ISO_VARIANTS[variant], '-V', 'DDK', '-o', iso, root], C);
  const base = await readFile(iso);
  const parsed = await Iso9660.open(new MemorySource(input, new Image(base)));
  const dirs = [parsed.root];
  for await (const e of parsed.walk()) if (e.isDirectory) dirs.push(e);
  const regions: Region[] = [];
  for (let s = 16; ; s++) {
    regions.push({ kind: 'descriptors', start: s * 2048, length: 2048, fields: ISO_DESCRIPTOR_FIELDS });
    if (base[s * 2048] === 255) break;
  }
  // Directories the walk hides (rr_moved) still get read.
  const extents = new Set(dirs.map((d) => d.extents[0]!.offset));
  for (const d of [...dirs]) {
    const { offset, length } = d.extents[0]!;
    for (let pos = offset; pos < offset + length; ) {
      const len = base[pos]!;
      if (len === 0) {
        pos = (Math.floor(pos / 2048) + 1) * 2048;
        continue;
      }
      const at = base.readUInt32LE(pos + 2) * 2048;
      const dot = base[pos + 32] === 1 && base[pos + 33]! <= 1;
      if (base[pos + 25]! & 2 && !dot && !extents.has(at)) {
        extents.add(at);
        dirs.push({ ...d, extents: [{ offset: at, length: base.readUInt32LE(pos + 10) }] });
      }
      pos += len;
    }
  }
  const ceAreas: Region[] = [];
  for (const d of dirs) {
    const { offset, length } = d.extents[0]!;
    const buf = base.subarray(offset, offset + length);
    regions.push({ kind: 'directories', start: offset, length, fields: isoRecordFields(buf, offset, true, false, 0) });
    const susp = isoRecordFields(buf, offset, false, true, 0);
    regions.push({ kind: 'susp', start: offset, length, fields: susp });
    for (const f of susp.filter((x) => x.name.endsWith('.CE.block'))) {
      const at = buf.readUInt32LE(f.off) * 2048 + buf.readUInt32LE(f.off + 8);
      const len = buf.readUInt32LE(f.off + 16);
      if (at + len <= base.length && !ceAreas.some((c) => c.start === at)) ceAreas.push({ kind: 'susp', start: at, length: len, fields: [] });
    }
  }
  regions.push(...ceAreas);
  const isoblocks = [0, 1, 16, 17, 18, base.length / 2048 - 1, base.length / 2048, ...[...dirs, ...ceAreas].map((d) => Math.floor(('start' in d ? d.start : d.extents[0]!.offset) / 2048))];
  const pointers = { isoblock: uniquePointers(isoblocks), byte: [0, 1, 2047, 2048, 2049, base.length, 2 ** 31, 2 ** 32 - 1] };
  const kinds = variant === 'iso' ? ['descriptors', 'directories', 'susp'] : ['descriptors', 'directories'];
  return kinds.map((kind) => ({
    name: `${variant}/${kind}`, input, base, regions: regions.filter((r) => r.kind === kind), all: regions, pointers, run: isoPipeline,
  }));
}

export const OVA_XML = `<?xml version="1.0" ?>
<appliance version="0.1">
  <vm name="vm">
    <label>XenServer DDK 8.2.1</label>
    <shortdesc>Driver Development Kit</shortdesc>
    <config mem_set="1073741824" vcpus="1"/>
    <hacks is_hvm="false" kernel_boot_cmdline="root=/dev/xvda1 ro "/>
    <vbd device="xvda" function="root" mode="w" vdi="vdi_xvda"/>
    <vbd device="xvdb" function="swap" mode="w" vdi="vdi_xvdb"/>
  </vm>
  <vdi name="vdi_xvda" size="4294967296" source="file://xvda" type="dir-gzipped-chunks" variety="system"/>
  <vdi name="vdi_xvdb" size="1000" source="file://xvdb" type="dir-gzipped-chunks" variety="system"/>
</appliance>
`;

/** Recompute every tar header's chksum (the 8 bytes at 148 counted as spaces), so field changes reach the parser behind it. */
function tarChecksumFix(regions: Region[]): (img: Image) => void {
  return (img) => {
    for (const r of regions.filter((x) => x.kind === 'header' && x.start + 512 <= img.size)) {
      const h = img.get(r.start, 512);
      h.fill(0x20, 148, 156);
      let sum = 0;
      for (const b of h) sum += b;
      img.set(r.start + 148, Buffer.from(`${sum.toString(8).padStart(6, '0')}\0 `, 'latin1'));
    }
  };
}

/** A tar as packTree writes it, with pax records (long and non-ASCII names, xattrs), links and devices. */
async function tarTarget(): Promise<Target> {
  const e = (path: string, type: TreeEntry['type'], extra: Partial<TreeEntry> = {}): TreeEntry => ({
    path: Buffer.from(path), type, mode: 0o644, uid: 0, gid: 0, size: 0, mtimeNs: 1_500_000_000_000_000_000n, ...extra,
  });
  const data = new Map<string, Buffer>([['etc/os-release', Buffer.from('ID=fuzz\n')], ['big', text(5000, 5)], [`${'n'.repeat(150)}`, Buffer.from('long\n')]]);
  const entries: TreeEntry[] = [
    e('', 'directory', { mode: 0o755 }), e('etc', 'directory', { mode: 0o755 }), e('etc/os-release', 'file', { size: 8, nlink: 2, ino: 5 }),
    e('hard', 'file', { size: 8, nlink: 2, ino: 5 }), e('big', 'file', { size: 5000, mtimeNs: 1_500_000_000_123_456_789n, uid: 3_000_000 }),
    e('n'.repeat(150), 'file', { size: 5, xattrs: new Map([['user.a', Buffer.from([0, 1, 2])], ['security.capability', Buffer.alloc(20, 1)]]) }),
    e('ütf-8', 'symlink', { symlinkTarget: Buffer.from('l'.repeat(120)) }), e('null', 'character-device', { devmajor: 1, devminor: 3 }),
    e('fifo', 'fifo'),
  ];
  const packed = packTree((async function* () { yield* entries; })(), (x) => (async function* () { yield data.get(x.path.toString())!; })());
  const parts: Buffer[] = [];
  for await (const c of packed.stream) parts.push(c as Buffer);
  const base = Buffer.concat(parts);
  const regions: Region[] = [];
  const octal = (name: string, off: number, width: number): Field => ({ name, off, width: 1, octal: width });
  for (let off = 0; off + 512 <= base.length && base[off] !== 0; ) {
    regions.push({
      kind: 'header', start: off, length: 512,
      fields: [octal('mode', 100, 8), octal('uid', 108, 8), octal('size', 124, 12), octal('mtime', 136, 12), octal('chksum', 148, 8),
        { name: 'typeflag', off: 156, width: 1 }, { name: 'name', off: 0, width: 8 }, { name: 'magic', off: 257, width: 4 }, { name: 'prefix', off: 345, width: 1 },
        octal('devmajor', 329, 8)],
    });
    const size = parseInt(base.toString('latin1', off + 124, off + 135), 8);
    const padded = Math.ceil(size / 512) * 512;
    if (base[off + 156] === 0x78 && size) regions.push({ kind: 'pax', start: off + 512, length: size, fields: [] });
    off += 512 + padded;
  }
  return {
    name: 'tar/headers', input: 'layer.tar', base, regions, all: regions, pointers: { byte: [0, 512, 1024, base.length] },
    fix: tarChecksumFix(regions),
    run: tarPipeline,
  };
}

/**
 * An XVA version 2 of `disk` made by scripts/make-xva (GNU tar, sha1sum): targets for its tar
 * headers (checksums recomputed), its ova.xml bytes, its checksum files and blocks, and ova.xml as text.
 */
async function xva2Targets(disk: string, dir: string): Promise<Target[]> {
  const out = join(dir, 'disk.xva');
  await execa(fileURLToPath(new URL('../../scripts/make-xva', import.meta.url)), ['--disk', disk, '--out', out], C);
  const base = await readFile(out);
  const regions: Region[] = [];
  const octal = (name: string, off: number, width: number): Field => ({ name, off, width: 1, octal: width });
  let ova: Buffer | undefined;
  for (let off = 0; off + 512 <= base.length && base[off] !== 0; ) {
    const name = base.toString('latin1', off, off + 100).replace(/\0.*$/s, '');
    const size = parseInt(base.toString('latin1', off + 124, off + 135), 8);
    regions.push({
      kind: 'header', start: off, length: 512,
      fields: [octal('size', 124, 12), octal('chksum', 148, 8), octal('mode', 100, 8), { name: 'typeflag', off: 156, width: 1 }, { name: 'name', off: 0, width: 8 },
        { name: 'name-end', off: name.length - 2, width: 2 }, { name: 'magic', off: 257, width: 4 }, { name: 'prefix', off: 345, width: 1 }],
    });
    const kind = name === 'ova.xml' ? 'ova' : name.endsWith('.checksum') ? 'checksum' : 'block';
    if (kind === 'ova') ova = base.subarray(off + 512, off + 512 + size);
    if (size) regions.push({ kind, start: off + 512, length: kind === 'block' ? Math.min(size, 4096) : size, fields: [] });
    off += 512 + Math.ceil(size / 512) * 512;
  }
  const fix = tarChecksumFix(regions);
  const pointers = { byte: uniquePointers([0, 512, 1024, 1 << 20, base.length]) };
  const target = (name: string, kinds: string[]): Target => ({ name, input: 'disk.xva', base, regions: regions.filter((r) => kinds.includes(r.kind)), all: regions, pointers, fix, run: xva2Pipeline });
  return [
    target('xva2/header', ['header']),
    target('xva2/ova', ['ova']),
    target('xva2/blocks', ['checksum', 'block']),
    { name: 'xva2/ova-xml', input: 'ova.xml', base: ova!, regions: [], all: [], pointers: {}, text: true, run: xva2OvaPipeline },
  ];
}

/** Raw bytes of a file whose partitions sfdisk lays out, with `images` written at their sectors. */
async function makeDisk(path: string, sectors: number, script: string, images: [number, Buffer][]): Promise<Buffer> {
  await writeFile(path, '');
  await truncate(path, sectors * 512);
  await execa('sfdisk', ['--no-reread', '--no-tell-kernel', '-q', path], { ...C, input: script });
  await writeAt(path, images.map(([sector, data]) => [sector * 512, data]), undefined, 'r+');
  return readFile(path);
}

/** Build every base image (mke2fs -d, sfdisk, qemu-img, xorriso) in `dir` and the targets over them. */
export async function buildCorpus(dir: string): Promise<Target[]> {
  const tree = join(dir, 'tree');
  const smallTree = join(dir, 'small-tree');
  await makeTree(tree);
  await makeTree(smallTree, false);
  const targets: Target[] = [];
  const ext = new Map<string, Buffer>();
  for (const spec of EXT_SPECS) {
    const img = await makeExt(spec, spec.small ? smallTree : tree, dir);
    ext.set(spec.name, await readFile(img));
    targets.push(...(await extTargets(spec, img)));
  }

  // MBR: root at sector 63 as on old disks, an extended partition with two logicals (an EBR chain).
  const ext3 = ext.get('ext3-1k')!;
  const extended = Math.ceil((63 + ext3.length / 512) / 2048) * 2048;
  const mbrSectors = extended + 2048;
  const mbrPath = join(dir, 'mbr.raw');
  const mbr = await makeDisk(mbrPath, mbrSectors, [
    'label: dos', 'label-id: 0x12345678', `start=63, size=${ext3.length / 512}, type=83, bootable`,
    `start=${extended}, size=2048, type=5`, `start=${extended + 1}, size=256, type=82`, `start=${extended + 360}, size=256, type=83`,
  ].join('\n'), [[63, ext3]]);
  const ebrs: number[] = [];
  const extStart = mbr.readUInt32LE(446 + 16 + 8);
  for (let at = extStart; ebrs.length < 8; ) {
    ebrs.push(at);
    const link = mbr.readUInt32LE(at * 512 + 446 + 16 + 8);
    if (mbr[at * 512 + 446 + 16 + 4] === 0) break;
    at = extStart + link;
  }
  const mbrRegions = [mbrRegion('mbr', 0, 4), ...ebrs.map((s) => mbrRegion('ebr', s, 2))];
  const mbrSectorsPool = { sector: uniquePointers([0, 1, 62, 63, 64, extStart, ...ebrs, ...ebrs.map((s) => s - extStart), mbrSectors - 1, mbrSectors, 2 ** 32 - 1]) };
  for (const kind of ['mbr', 'ebr']) {
    targets.push({ name: `mbr/${kind}`, input: 'mbr.raw', base: mbr, regions: mbrRegions.filter((r) => r.kind === kind), all: mbrRegions, pointers: mbrSectorsPool, run: diskPipeline });
  }

  // GPT: root at 2048, a swap partition, backup header and array at the end.
  const ext4 = ext.get('ext4-4k')!;
  const gptSectors = 2048 + ext4.length / 512 + 512 + 2048;
  const gpt = await makeDisk(join(dir, 'gpt.raw'), gptSectors, [
    'label: gpt', `label-id: ${FIXED_UUID}`, `start=2048, size=${ext4.length / 512}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=${FIXED_UUID}`,
    `size=512, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F, uuid=${FIXED_UUID.replace('0f', '1f')}`,
  ].join('\n'), [[2048, ext4]]);
  const gptRegions: Region[] = [];
  for (const [kind, lba] of [['primary', 1], ['backup', gptSectors - 1]] as const) {
    const h = gpt.subarray(lba * 512, lba * 512 + 512);
    const entryLba = Number(h.readBigUInt64LE(72));
    const count = h.readUInt32LE(80);
    gptRegions.push({ kind, start: lba * 512, length: 92, fields: GPT_HEADER_FIELDS });
    gptRegions.push({ kind, start: entryLba * 512, length: count * 128, fields: gptEntryFields(4) });
  }
  const gptPool = { sector: uniquePointers([0, 1, 2, 33, 34, 2047, 2048, 2048 + ext4.length / 512, gptSectors - 34, gptSectors - 33, gptSectors - 1, gptSectors, 2 ** 32]) };
  targets.push({ name: 'gpt/primary', input: 'gpt.raw', base: gpt, regions: gptRegions.filter((r) => r.kind === 'primary'), all: gptRegions, pointers: gptPool, fix: fixGpt, run: diskPipeline });
  targets.push({
    name: 'gpt/backup', input: 'gpt.raw', base: gpt, regions: gptRegions.filter((r) => r.kind === 'backup'), all: gptRegions, pointers: gptPool, fix: fixGpt,
    // Mostly with the primary header broken, so that the backup is what gets read.
    prepare: (rng, img, log) => {
      if (!rng.chance(0.7)) return;
      img.set(512, Buffer.from('EFI BROK'));
      log.push('primary GPT signature broken');
    },
    run: diskPipeline,
  });

  // VHDs: the MBR disk as a fixed VHD, the GPT disk as a dynamic one.
  const vhds: [string, string, Buffer][] = [];
  for (const [name, raw, sub] of [['fixed', mbrPath, 'fixed'], ['dynamic', join(dir, 'gpt.raw'), 'dynamic']] as const) {
    const out = join(dir, `${name}.vhd`);
    await execa('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'vpc', '-o', `subformat=${sub},force_size=on`, raw, out], C);
    vhds.push([name, `${name}.vhd`, await readFile(out)]);
  }
  for (const [name, input, base] of vhds) {
    const footer = base.length - 512;
    const regions: Region[] = [{ kind: 'footer', start: footer, length: 512, fields: VHD_FOOTER_FIELDS }];
    const bytePool = [0, 512, 1024, 1536, footer, base.length, 2 ** 32, 2 ** 53 - 1];
    let headerAt: number | undefined;
    if (name === 'dynamic') {
      regions.push({ kind: 'footer', start: 0, length: 512, fields: VHD_FOOTER_FIELDS });
      headerAt = Number(base.readBigUInt64BE(16));
      const tableAt = Number(base.readBigUInt64BE(headerAt + 16));
      const entries = base.readUInt32BE(headerAt + 28);
      regions.push({ kind: 'header', start: headerAt, length: 1024, fields: VHD_HEADER_FIELDS });
      regions.push({ kind: 'bat', start: tableAt, length: entries * 4, fields: Array.from({ length: entries }, (_, i) => ({ name: `BAT[${i}]`, off: i * 4, width: 4, be: true, unit: 'sector' }) as Field) });
      const sectors: number[] = [];
      for (let i = 0; i < entries; i++) {
        const s = base.readUInt32BE(tableAt + i * 4);
        if (s === 0xffffffff) continue;
        sectors.push(s);
        regions.push({ kind: 'bitmap', start: s * 512, length: 512, fields: [] });
      }
      bytePool.push(headerAt, tableAt);
      const pointers = { byte: uniquePointers(bytePool), sector: uniquePointers([0, 1, 2, 3, footer / 512, base.length / 512, ...sectors, 0xfffffffe]) };
      for (const kind of ['footer', 'header', 'bat', 'bitmap']) {
        targets.push({ name: `vhd-dynamic/${kind}`, input, base, regions: regions.filter((r) => r.kind === kind), all: regions, pointers, fix: (img) => fixVhd(img, headerAt), run: vhdPipeline });
      }
    } else {
      targets.push({ name: 'vhd-fixed/footer', input, base, regions, all: regions, pointers: { byte: uniquePointers(bytePool) }, fix: (img) => fixVhd(img), run: vhdPipeline });
    }
  }

  const isoTree = join(dir, 'iso-tree');
  await makeIsoTree(isoTree, tree);
  for (const variant of ['iso', 'iso-joliet', 'iso-plain'] as const) targets.push(...(await isoTargets(variant, isoTree, dir)));
  targets.push(await tarTarget());
  targets.push(...(await xva2Targets(mbrPath, dir)));
  const xva = Buffer.from(`${OVA_XML}\n\0\nchunk-000000000.gz\nchunk-000000002.gz\nTRANS.TBL`, 'latin1');
  targets.push({ name: 'xva/ova-xml', input: 'ova.xml', base: xva, regions: [], all: [], pointers: {}, text: true, run: xvaPipeline });
  return targets;
}
