import { createHash } from 'node:crypto';
import { Transform, type Readable } from 'node:stream';
import { readTar, type TarEntryType } from './formats/tar.js';

/**
 * A file tree as plain data, built from a tar stream, so that two trees (the kernel's mount and
 * an image layer, or two engines' outputs) can be compared entry by entry.
 */
export interface ManifestEntry {
  type: Exclude<TarEntryType, 'hardlink'>;
  mode: number;
  uid: number;
  gid: number;
  size: number;
  sha256?: string;
  linkname?: string;
  devmajor?: number;
  devminor?: number;
  mtimeNs: bigint;
  /** xattr name → hex value */
  xattrs: Record<string, string>;
  /** For regular files with more than one name: the smallest path of its hard-link group. */
  linkGroup?: string;
}

export type Manifest = Map<string, ManifestEntry>;

/** A printable, injective spelling of a raw path: UTF-8 where valid, \xNN escapes otherwise. */
export function displayPath(raw: Buffer): string {
  const text = raw.toString('utf8');
  if (Buffer.from(text, 'utf8').equals(raw)) return text.replace(/\\/g, '\\\\');
  let out = '';
  for (const b of raw) out += b >= 0x20 && b < 0x7f && b !== 0x5c ? String.fromCharCode(b) : b === 0x5c ? '\\\\' : `\\x${b.toString(16).padStart(2, '0')}`;
  return out;
}

export async function manifestFromTar(stream: Readable, input: string): Promise<Manifest> {
  const entries: Manifest = new Map();
  const links: [string, string][] = [];
  await readTar(stream, input, async (h, data) => {
    const path = displayPath(h.path);
    if (h.type === 'hardlink') {
      links.push([path, displayPath(h.linkname)]);
      return;
    }
    const xattrs: Record<string, string> = {};
    for (const [k, v] of [...h.xattrs].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) xattrs[k] = v.toString('hex');
    const e: ManifestEntry = { type: h.type, mode: h.mode, uid: h.uid, gid: h.gid, size: h.type === 'file' ? h.size : 0, mtimeNs: h.mtimeNs, xattrs };
    if (h.type === 'file') {
      const hash = createHash('sha256');
      for await (const chunk of data) hash.update(chunk);
      e.sha256 = hash.digest('hex');
    }
    if (h.type === 'symlink') e.linkname = displayPath(h.linkname);
    if (h.type === 'character-device' || h.type === 'block-device') {
      e.devmajor = h.devmajor;
      e.devminor = h.devminor;
    }
    entries.set(path, e);
  });
  // Hard links: every name of a group gets the target's attributes and one group id.
  const groups = new Map<string, string[]>();
  for (const [name, target] of links) {
    const t = entries.get(target);
    if (!t) throw new Error(`${input}: hard link ${name} points to ${target}, which is not in the archive before it`);
    const members = groups.get(target) ?? [target];
    members.push(name);
    groups.set(target, members);
  }
  for (const members of groups.values()) {
    const data = entries.get(members[0]!)!;
    const group = [...members].sort()[0]!;
    for (const m of members) entries.set(m, { ...data, linkGroup: group });
  }
  return entries;
}

export interface CompareOptions {
  /** Compare mtimes at this precision in nanoseconds (1 = exact, 1e9 = whole seconds); 0 skips them. */
  mtimePrecisionNs?: bigint;
  /** Map both sides' mtimes before comparing them (e.g. to what Docker's tar writer keeps). */
  mtime?: (ns: bigint) => bigint;
  /** Paths to leave out on both sides (e.g. what `docker export` adds). */
  ignore?: (path: string) => boolean;
  /** Compare the root directory's own attributes (tools disagree on them). */
  includeRoot?: boolean;
}

const FIELDS = ['type', 'mode', 'uid', 'gid', 'size', 'sha256', 'linkname', 'devmajor', 'devminor', 'linkGroup'] as const;

/** One field of one entry that differs; `entry` when the path is only on one side (the other is null). */
export interface Difference {
  path: string;
  field: (typeof FIELDS)[number] | 'entry' | 'mtime' | 'xattrs';
  expected: string | number | null;
  actual: string | number | null;
}

/** Differences between two manifests, entry by entry in path order; empty when equal. */
export function diffManifests(expected: Manifest, actual: Manifest, opts: CompareOptions = {}): Difference[] {
  const precision = opts.mtimePrecisionNs ?? 1n;
  const mtime = opts.mtime ?? ((ns: bigint) => ns);
  const skip = (p: string) => (!opts.includeRoot && p === '') || (opts.ignore?.(p) ?? false);
  const diffs: Difference[] = [];
  const paths = [...new Set([...expected.keys(), ...actual.keys()])].sort();
  for (const path of paths) {
    if (skip(path)) continue;
    const a = expected.get(path);
    const b = actual.get(path);
    if (!a || !b) {
      diffs.push({ path, field: 'entry', expected: a?.type ?? null, actual: b?.type ?? null });
      continue;
    }
    for (const field of FIELDS) {
      if (a[field] !== b[field]) diffs.push({ path, field, expected: a[field] ?? null, actual: b[field] ?? null });
    }
    if (precision > 0n && mtime(a.mtimeNs) / precision !== mtime(b.mtimeNs) / precision) diffs.push({ path, field: 'mtime', expected: String(a.mtimeNs), actual: String(b.mtimeNs) });
    const ax = JSON.stringify(a.xattrs);
    const bx = JSON.stringify(b.xattrs);
    if (ax !== bx) diffs.push({ path, field: 'xattrs', expected: ax, actual: bx });
  }
  return diffs;
}

/** Differences between two manifests, one human-readable line each; empty when equal. */
export function compareManifests(expected: Manifest, actual: Manifest, opts: CompareOptions = {}): string[] {
  return diffManifests(expected, actual, opts).map(formatDifference);
}

export function formatDifference(d: Difference): string {
  if (d.field === 'entry') return d.actual === null ? `${d.path}: missing (${d.expected})` : `${d.path}: unexpected entry (${d.actual})`;
  return `${d.path}: ${d.field} ${fmt(d.expected)} != ${fmt(d.actual)}`;
}

/**
 * What Docker's own tar writer (daemon 20.10: `docker export`, and a saved layer it cannot hand
 * back byte for byte) keeps of an mtime: whole seconds, and 0 for times before 1970.
 */
export function dockerTarMtime(ns: bigint): bigint {
  return ns < 0n ? 0n : ns - (ns % 1_000_000_000n);
}

/** A layer tar's manifest, and at the same time the sha256 of its bytes (its diffID) and its size. */
export async function manifestWithDigest(stream: Readable, input: string, onBytes?: (n: number) => void): Promise<{ manifest: Manifest; diffId: string; bytes: number }> {
  const hash = createHash('sha256');
  let bytes = 0;
  const counted = stream.pipe(
    new Transform({
      highWaterMark: 1 << 20,
      transform(chunk: Buffer, _enc, cb) {
        hash.update(chunk);
        bytes += chunk.length;
        onBytes?.(chunk.length);
        cb(null, chunk);
      },
    }),
  );
  stream.once('error', (err) => counted.destroy(err));
  // readTar reads on to the end of the stream (record padding too): the hash covers every byte.
  const manifest = await manifestFromTar(counted, input);
  return { manifest, diffId: `sha256:${hash.digest('hex')}`, bytes };
}

function fmt(v: unknown): string {
  return typeof v === 'number' && v > 7 ? `${v} (0${v.toString(8)})` : String(v);
}
