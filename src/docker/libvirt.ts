import { createHash } from 'node:crypto';
import { chmod, lstat, mkdir, mkdtemp, readdir, readlink, rename, rm, rmdir, stat, writeFile } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import type { Readable } from 'node:stream';
import { XMLBuilder } from 'fast-xml-parser';
import { CancelledError, InputError, throwIfAborted } from '../errors.js';
import { which } from '../host/exec.js';
import { blob, imageConfig, MEDIA_TYPES, type Architecture, type ImageMeta } from './image.js';
import type { OutputResult, WriteOptions } from './rootfs.js';
import { privileges, unpackLayer, type Privileges } from './unpack.js';

/**
 * `libvirt-lxc:DIR`: the root file system unpacked into DIR/rootfs and DIR/domain.xml, a libvirt
 * LXC domain that boots it (`virsh -c lxc:/// define DIR/domain.xml`). DIR is built beside its
 * final name and renamed into place, so a half-written tree is never presented as the result.
 */

export interface LibvirtLxcResult {
  domainXml: string;
  rootfs: string;
  name: string;
  uuid: string;
  /** What the domain runs as its init: /sbin/init when the tree has one, else a shell. */
  init: string;
  /** False when not privileged: the tree then belongs to the user who converted it. */
  ownersPreserved: boolean;
  devicesSkipped: number;
  xattrsSkipped: number;
  /** What a user must know about the tree (left-out devices, owners), one sentence each. */
  warnings: string[];
}

/** Tried in this order; the first executable regular file in the tree (symlinks resolved inside it) boots. */
const INITS = ['/sbin/init', '/bin/bash', '/bin/sh'];
const MEMORY_MIB = 1024;
/** The namespace of our name-based (version 5) domain UUIDs: a fixed random UUID. */
const UUID_NAMESPACE = Buffer.from('6f1c1e4a3b7d4f0a9a52c8e4d1f0b7a3', 'hex');
const MAX_SYMLINKS = 40;

const LIBVIRT_ARCH: Record<Architecture, string> = { amd64: 'x86_64', '386': 'i686' };

/**
 * Resolve `path` inside `root` as a chroot would: absolute symlink targets start at `root`, ".."
 * stops at it, so nothing outside the tree is ever looked at. Undefined when it does not resolve.
 */
export async function resolveInTree(root: string, path: string): Promise<{ path: string; mode: number; isFile: boolean } | undefined> {
  const pending = path.split('/').filter(Boolean);
  const done: string[] = [];
  let links = 0;
  while (pending.length) {
    const part = pending.shift()!;
    if (part === '.') continue;
    if (part === '..') {
      done.pop();
      continue;
    }
    const at = join(root, ...done, part);
    const st = await lstat(at).catch(() => undefined);
    if (!st) return undefined;
    if (st.isSymbolicLink()) {
      if (++links > MAX_SYMLINKS) return undefined;
      const target = await readlink(at);
      if (target.startsWith('/')) done.length = 0;
      pending.unshift(...target.split('/').filter(Boolean));
      continue;
    }
    if (pending.length && !st.isDirectory()) return undefined;
    done.push(part);
    if (!pending.length) return { path: `/${done.join('/')}`, mode: st.mode, isFile: st.isFile() };
  }
  return undefined;
}

async function findInit(root: string): Promise<string | undefined> {
  for (const candidate of INITS) {
    const found = await resolveInTree(root, candidate);
    if (found?.isFile && (found.mode & 0o111) !== 0) return candidate;
  }
  return undefined;
}

/** libvirt names: letters, digits and "_.+-", from the tag or the source's name. */
export function domainName(meta: ImageMeta): string {
  const source = meta.config.Labels?.['ddk2docker.source.name'];
  const from = meta.tag ?? (source ? source.replace(/\.(iso|xva|vhd|raw|img)$/i, '') : 'ddk');
  const name = from.replace(/[^A-Za-z0-9_.+-]+/g, '-').replace(/^[-.]+|[-.]+$/g, '').slice(0, 64);
  // An all-digit name would be taken for a domain id by virsh.
  return name === '' ? 'ddk' : /^\d+$/.test(name) ? `ddk-${name}` : name;
}

/** RFC 4122 version 5: the same layer written to the same place gives the same domain, every run. */
export function domainUuid(diffId: string, dir: string, name: string): string {
  const h = createHash('sha1').update(UUID_NAMESPACE).update(`${diffId}\n${dir}\n${name}`).digest().subarray(0, 16);
  h[6] = (h[6]! & 0x0f) | 0x50;
  h[8] = (h[8]! & 0x3f) | 0x80;
  const hex = h.toString('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

export interface DomainSpec {
  name: string;
  uuid: string;
  description: string;
  architecture: Architecture;
  init: string;
  /** Absolute path of the root file system on the host. */
  rootfs: string;
  /** Map the container's root to this host uid/gid (the tree's owner when it was unpacked unprivileged). */
  idmap?: { uid: number; gid: number };
}

/** The domain XML; the builder escapes every value. */
export function domainXml(spec: DomainSpec): string {
  const builder = new XMLBuilder({ ignoreAttributes: false, attributeNamePrefix: '@_', format: true, indentBy: '  ', suppressEmptyNode: true });
  const domain = {
    '@_type': 'lxc',
    name: spec.name,
    uuid: spec.uuid,
    description: spec.description,
    memory: { '@_unit': 'MiB', '#text': MEMORY_MIB },
    os: { type: { '@_arch': LIBVIRT_ARCH[spec.architecture], '#text': 'exe' }, init: spec.init },
    // A private network namespace (loopback only) until the user adds an <interface>.
    features: { privnet: '' },
    ...(spec.idmap
      ? { idmap: { uid: { '@_start': 0, '@_target': spec.idmap.uid, '@_count': 1 }, gid: { '@_start': 0, '@_target': spec.idmap.gid, '@_count': 1 } } }
      : {}),
    devices: {
      filesystem: { '@_type': 'mount', '@_accessmode': 'passthrough', source: { '@_dir': spec.rootfs }, target: { '@_dir': '/' } },
      console: { '@_type': 'pty' },
    },
  };
  return builder.build({ domain }) as string;
}

/** XML 1.0 cannot hold most control characters, so neither can a path written into domain.xml. */
// eslint-disable-next-line no-control-regex
const NOT_XML = /[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffe\uffff]/;

/**
 * DIR must be new or an empty directory: it will hold a whole root file system. True when it
 * exists (empty).
 */
export async function checkLibvirtTarget(target: string, abs = resolve(target)): Promise<boolean> {
  if (NOT_XML.test(abs)) throw new InputError(target, 'has control characters, which domain.xml cannot hold');
  const parent = await stat(dirname(abs)).catch(() => undefined);
  if (!parent?.isDirectory()) throw new InputError(target, `directory ${dirname(abs)} does not exist`);
  const existing = await lstat(abs).catch(() => undefined);
  if (!existing) return false;
  if (!existing.isDirectory()) throw new InputError(target, 'exists and is not a directory');
  if ((await readdir(abs)).length > 0) throw new InputError(target, 'exists and is not empty; refusing to write into it');
  return true;
}

/**
 * Remove a tree this process wrote. Unprivileged, a directory without write permission (0555, as
 * /usr/lib is on CentOS 7) cannot be emptied: give its owner (us) access first.
 */
async function removeTree(path: string): Promise<void> {
  try {
    await rm(path, { recursive: true, force: true });
  } catch {
    await openUp(path);
    await rm(path, { recursive: true, force: true });
  }
}

async function openUp(dir: string): Promise<void> {
  await chmod(dir, 0o700).catch(() => undefined);
  for (const d of await readdir(dir, { withFileTypes: true }).catch(() => [])) {
    if (d.isDirectory()) await openUp(join(dir, d.name));
  }
}

function warnings(p: Privileges, devicesSkipped: number, xattrsSkipped: number): string[] {
  const out: string[] = [];
  if (!p.chown) out.push(`not privileged (no CAP_CHOWN): every file belongs to uid ${process.getuid?.()}, not to its owner in the image; domain.xml maps the container's root to that uid`);
  if (devicesSkipped) out.push(`${devicesSkipped} device node${devicesSkipped === 1 ? '' : 's'} left out (making them needs CAP_MKNOD); libvirt gives the container its own /dev`);
  if (xattrsSkipped) out.push(`${xattrsSkipped} extended attribute${xattrsSkipped === 1 ? '' : 's'} left out (security.capability needs CAP_SETFCAP, trusted.* and other security.* need CAP_SYS_ADMIN)`);
  return out;
}

export async function writeLibvirtLxc(layer: Readable, target: string, meta: ImageMeta, opts: WriteOptions): Promise<OutputResult & { libvirt: LibvirtLxcResult }> {
  throwIfAborted(opts.signal);
  const abs = resolve(target);
  const existed = await checkLibvirtTarget(target, abs);
  // 0700 from mkdtemp, and it stays so: the tree holds the image's setuid-root programs and
  // device nodes, which other users of this host must not reach through it.
  const temp = await mkdtemp(join(dirname(abs), `${basename(abs)}.partial-`));
  try {
    const rootfs = join(temp, 'rootfs');
    await mkdir(rootfs);
    const p = await privileges();
    const unpacked = await unpackLayer(layer, rootfs, { signal: opts.signal, onProgress: opts.onProgress, input: `layer for ${target}`, privileges: p });
    const init = await findInit(rootfs);
    if (!init) throw new InputError(target, `the root file system has none of ${INITS.join(', ')} as an executable file: the domain would have nothing to boot`);
    const name = domainName(meta);
    const uuid = domainUuid(unpacked.diffId, abs, name);
    const source = meta.config.Labels?.['ddk2docker.source.name'];
    const xml = domainXml({
      name,
      uuid,
      description: `${source ? `${source}, ` : ''}layer ${unpacked.diffId}, written by ddk2docker`,
      architecture: meta.architecture,
      init,
      rootfs: join(abs, 'rootfs'),
      ...(p.chown ? {} : { idmap: { uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0 } }),
    });
    await writeFile(join(temp, 'domain.xml'), xml, { mode: 0o644 });
    throwIfAborted(opts.signal);
    if (existed) await rmdir(abs);
    await rename(temp, abs);
    const config = blob(MEDIA_TYPES.config, imageConfig({ ...meta, os: meta.os ?? 'linux', diffId: unpacked.diffId }));
    return {
      path: abs,
      diffId: unpacked.diffId,
      layerBytes: unpacked.layerBytes,
      layerDigest: unpacked.diffId,
      storedBytes: unpacked.layerBytes,
      configDigest: config.descriptor.digest,
      libvirt: {
        domainXml: join(abs, 'domain.xml'),
        rootfs: join(abs, 'rootfs'),
        name,
        uuid,
        init,
        ownersPreserved: unpacked.ownersPreserved,
        devicesSkipped: unpacked.devicesSkipped,
        xattrsSkipped: unpacked.xattrsSkipped,
        warnings: warnings(p, unpacked.devicesSkipped, unpacked.xattrsSkipped),
      },
    };
  } catch (e) {
    await removeTree(temp);
    throw opts.signal?.aborted && !(e instanceof CancelledError) ? new CancelledError() : e;
  }
}

/** For doctor: whether this output works here, and with what fidelity. */
export async function libvirtLxcCheck(gnuTar: boolean): Promise<{ ok: boolean; detail: string }> {
  if (!gnuTar) return { ok: false, detail: 'needs GNU tar (it writes the tree: nanosecond mtimes, xattrs, device nodes)' };
  const p = await privileges();
  const full = p.chown && p.mknod && p.setfcap;
  // virt-xml-validate is a shell script around xmllint: both are needed.
  const validate = (await which('virt-xml-validate')) && (await which('xmllint')) ? '' : '; to check domain.xml, install virt-xml-validate (libvirt-clients) and xmllint (libxml2-utils)';
  return {
    ok: true,
    detail: (full
      ? 'full fidelity: owners, device nodes, file capabilities'
      : `without ${[!p.chown && 'CAP_CHOWN (owners: yours, container root mapped to you)', !p.mknod && 'CAP_MKNOD (device nodes left out)', !p.setfcap && 'CAP_SETFCAP (file capabilities left out)'].filter(Boolean).join(', ')}`) + validate,
  };
}
