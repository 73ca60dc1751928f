import { createHash } from 'node:crypto';
import type { Readable } from 'node:stream';
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
  /** Paths to leave out on both sides (e.g. what `docker export` adds). */
  ignore?: (path: string) => boolean;
  /** Compare the root directory's own attributes (tools disagree on them). */
  includeRoot?: boolean;
}

const FIELDS = ['type', 'mode', 'uid', 'gid', 'size', 'sha256', 'linkname', 'devmajor', 'devminor', 'linkGroup'] as const;

/** Differences between two manifests, one human-readable line each; empty when equal. */
export function compareManifests(expected: Manifest, actual: Manifest, opts: CompareOptions = {}): string[] {
  const precision = opts.mtimePrecisionNs ?? 1n;
  const skip = (p: string) => (!opts.includeRoot && p === '') || (opts.ignore?.(p) ?? false);
  const diffs: string[] = [];
  const paths = [...new Set([...expected.keys(), ...actual.keys()])].sort();
  for (const p of paths) {
    if (skip(p)) continue;
    const a = expected.get(p);
    const b = actual.get(p);
    if (!a) { diffs.push(`${p}: unexpected entry (${b!.type})`); continue; }
    if (!b) { diffs.push(`${p}: missing (${a.type})`); continue; }
    for (const f of FIELDS) {
      if (a[f] !== b[f]) diffs.push(`${p}: ${f} ${fmt(a[f])} != ${fmt(b[f])}`);
    }
    if (precision > 0n && a.mtimeNs / precision !== b.mtimeNs / precision) diffs.push(`${p}: mtime ${a.mtimeNs} != ${b.mtimeNs}`);
    const ax = JSON.stringify(a.xattrs);
    const bx = JSON.stringify(b.xattrs);
    if (ax !== bx) diffs.push(`${p}: xattrs ${ax} != ${bx}`);
  }
  return diffs;
}

function fmt(v: unknown): string {
  return typeof v === 'number' && v > 7 ? `${v} (0${v.toString(8)})` : String(v);
}
