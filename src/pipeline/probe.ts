import { lstat, open, readdir, readlink } from 'node:fs/promises';
import { InputError } from '../errors.js';
import { applyChanges, type Architecture } from '../docker/image.js';
import { ELF_HEADER_PREFIX, elfArchitecture, parseElfIdent, type ElfIdent } from '../formats/elf.js';
import type { ExtFileSystem } from '../formats/ext/index.js';
import { parseOsRelease } from './inspect.js';
import { UNAME_SHIM_PATH } from './uname-shim.js';

/**
 * What the root file system says about the image that fits it, read before the image config is
 * made: the platform (from ELF binaries), the Dom0 kernel version (from /lib/modules and the
 * kernel-devel trees under /usr/src/kernels), the release line, the shell, and what the uname
 * shim needs. Both engines read the same facts: the builtin one through the ext reader, the host
 * one under its read-only mount, with symlinks resolved inside the tree, never on the host.
 */

export type TreeNodeType = 'file' | 'directory' | 'symlink' | 'other';

export interface TreeNode {
  type: TreeNodeType;
  mtimeNs: bigint;
}

/** Read access to a root file system by paths relative to its root ("etc/redhat-release"). */
export interface TreeReader {
  /** Symlinks in the middle resolve inside the tree (absolute ones at its root); the last one only with `follow`. */
  stat(path: string, follow: boolean): Promise<TreeNode | undefined>;
  /** Up to `max` bytes from the start of the regular file at `path` (symlinks followed inside the tree). */
  head(path: string, max: number): Promise<Buffer | undefined>;
  /** The names in the directory at `path` (symlinks followed inside the tree), sorted by bytes; none when it is not one. */
  list(path: string): Promise<string[]>;
}

/** As the kernel's MAXSYMLINKS, and the ext reader's lookup. */
const MAX_SYMLINKS = 40;
const SLASH = 0x2f;

function nodeType(t: string): TreeNodeType {
  return t === 'file' || t === 'directory' || t === 'symlink' ? t : 'other';
}

/** The builtin engine's view: the ext reader, whose lookup already resolves symlinks inside the file system. */
export function extTree(fs: ExtFileSystem): TreeReader {
  return {
    async stat(path, follow) {
      const e = await fs.lookup(path, { follow });
      return e && { type: nodeType(e.type), mtimeNs: e.mtimeNs };
    },
    async head(path, max) {
      const e = await fs.lookup(path, { follow: true });
      if (!e || e.type !== 'file') return undefined;
      const parts: Buffer[] = [];
      let n = 0;
      for await (const chunk of fs.readFile(e)) {
        parts.push(chunk);
        n += chunk.length;
        if (n >= max) break;
      }
      return Buffer.concat(parts).subarray(0, max);
    },
    async list(path) {
      const e = await fs.lookup(path, { follow: true });
      if (!e || e.type !== 'directory') return [];
      return (await fs.readdir(e)).map((n) => n.toString('utf8'));
    },
  };
}

function components(p: Buffer): Buffer[] {
  const out: Buffer[] = [];
  let start = 0;
  for (let i = 0; i <= p.length; i++) {
    if (i === p.length || p[i] === SLASH) {
      const c = p.subarray(start, i);
      if (c.length && !(c.length === 1 && c[0] === 0x2e)) out.push(c);
      start = i + 1;
    }
  }
  return out;
}

async function lstatOrUndefined(path: Buffer) {
  try {
    return await lstat(path, { bigint: true });
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') return undefined;
    throw err;
  }
}

/**
 * The host engine's view: files under the read-only mount at `root`. Every symlink is read and
 * resolved here against `root` (an absolute target starts at the image's root, ".." stops there),
 * the way the ext reader resolves it, so no path of the image ever reaches a host path.
 */
export function mountTree(root: string, input: string): TreeReader {
  const rootPath = Buffer.from(root);
  const full = (chain: Buffer[]) => Buffer.concat([rootPath, ...chain.flatMap((c) => [Buffer.from('/'), c])]);

  async function resolve(path: string, follow: boolean) {
    const rootStat = await lstat(rootPath, { bigint: true });
    let chain: { name: Buffer; st: typeof rootStat }[] = [];
    const queue = components(Buffer.from(path));
    let hops = 0;
    while (queue.length > 0) {
      const c = queue.shift()!;
      if (c.length === 2 && c[0] === 0x2e && c[1] === 0x2e) {
        chain.pop();
        continue;
      }
      const cur = chain.length ? chain[chain.length - 1]!.st : rootStat;
      if (!cur.isDirectory()) return undefined;
      const names = [...chain.map((x) => x.name), c];
      const st = await lstatOrUndefined(full(names));
      if (!st) return undefined;
      if (st.isSymbolicLink() && (queue.length > 0 || follow)) {
        if (++hops > MAX_SYMLINKS) throw new InputError(input, `too many levels of symbolic links resolving ${JSON.stringify(path)}`);
        const target = await readlink(full(names), { encoding: 'buffer' });
        if (target[0] === SLASH) chain = [];
        queue.unshift(...components(target));
        continue;
      }
      chain.push({ name: c, st });
    }
    return { path: full(chain.map((x) => x.name)), st: chain.length ? chain[chain.length - 1]!.st : rootStat };
  }

  const reader: TreeReader = {
    async stat(path, follow) {
      const r = await resolve(path, follow);
      if (!r) return undefined;
      const type = r.st.isFile() ? 'file' : r.st.isDirectory() ? 'directory' : r.st.isSymbolicLink() ? 'symlink' : 'other';
      return { type, mtimeNs: r.st.mtimeNs };
    },
    async head(path, max) {
      const r = await resolve(path, true);
      if (!r || !r.st.isFile()) return undefined;
      const file = await open(r.path, 'r');
      try {
        const buf = Buffer.alloc(max);
        const { bytesRead } = await file.read(buf, 0, max, 0);
        return buf.subarray(0, bytesRead);
      } finally {
        await file.close();
      }
    },
    async list(path) {
      const r = await resolve(path, true);
      if (!r || !r.st.isDirectory()) return [];
      return (await readdir(r.path, { encoding: 'buffer' })).sort(Buffer.compare).map((n) => n.toString('utf8'));
    },
  };

  /** A system call failing inside the mount (a corrupt inode) names the input and the image's path, not the mount point. */
  function failure(path: string, err: unknown): unknown {
    const e = err as NodeJS.ErrnoException;
    if (typeof e.errno !== 'number' || !e.syscall) return err;
    // EUCLEAN, as ext4 reports a corrupt structure; Node has no text for it.
    const why = e.errno === -117 ? 'Structure needs cleaning' : e.message.replace(/^\w+: /, '').replace(/, \w+ '[\s\S]*$/, '');
    return new InputError(input, `${JSON.stringify(path)}: ${e.syscall}: ${why}`, { cause: err });
  }
  return {
    stat: (path, follow) => reader.stat(path, follow).catch((err: unknown) => Promise.reject(failure(path, err))),
    head: (path, max) => reader.head(path, max).catch((err: unknown) => Promise.reject(failure(path, err))),
    list: (path) => reader.list(path).catch((err: unknown) => Promise.reject(failure(path, err))),
  };
}

/** Binaries whose ELF header gives the platform, most telling first (bash is what the image runs by default). */
export const ELF_CANDIDATES = ['bin/bash', 'bin/sh', 'sbin/init', 'usr/bin/env', 'bin/ls'];

/**
 * A kernel version as a directory name may spell it. Anything else is left out: the version goes
 * into an ENV instruction and the uname shim, and a name from the image must not reach either as code.
 */
const KERNEL_NAME = /^[0-9][A-Za-z0-9._+~-]{0,127}$/;
/** RHEL 5 names kernel-devel trees "<uname -r>-<arch>"; later releases name them "<uname -r>". */
const DEVEL_ARCH_SUFFIX = /-(?:i[3-6]86|x86_64)$/;
const TEXT_LIMIT = 64 * 1024;

export interface RootProbe {
  /** The first of ELF_CANDIDATES that is an ELF file, and what its header says. */
  elf?: { path: string; ident: ElfIdent; architecture?: '386' | 'amd64' };
  /** Kernel versions under /lib/modules, and of the kernel-devel trees under /usr/src/kernels. */
  modules: string[];
  devel: string[];
  /** The Dom0 kernel version, when any was found, and why that one when there were several. */
  kernel?: string;
  kernelChoice?: string;
  /** First line of /etc/redhat-release, else PRETTY_NAME of /etc/os-release. */
  release?: string;
  /** /bin/bash when the tree has it as a file, else /bin/sh. */
  shell: '/bin/bash' | '/bin/sh';
  /** What the uname shim needs: whether /usr/local/bin/uname exists, /usr/local/bin is a real directory, /bin/uname's mtime. */
  uname: { exists: boolean; binDir: boolean; mtimeNs: bigint };
}

/** rpmvercmp's order, simplified: runs of digits compare as numbers and beat runs of letters. */
export function compareVersions(a: string, b: string): number {
  const x = a.match(/\d+|[A-Za-z]+/g) ?? [];
  const y = b.match(/\d+|[A-Za-z]+/g) ?? [];
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    const p = x[i]!;
    const q = y[i]!;
    const pn = /^\d/.test(p);
    const qn = /^\d/.test(q);
    if (pn !== qn) return pn ? 1 : -1;
    if (pn) {
      const u = p.replace(/^0+/, '');
      const v = q.replace(/^0+/, '');
      if (u.length !== v.length) return u.length - v.length;
      if (u !== v) return u < v ? -1 : 1;
    } else if (p !== q) return p < q ? -1 : 1;
  }
  if (x.length !== y.length) return x.length - y.length;
  return a < b ? -1 : a > b ? 1 : 0;
}

/** The kernel builds should target: one with both modules and a kernel-devel tree if any, the newest of those. */
export function chooseKernel(modules: string[], devel: string[]): { kernel?: string; choice?: string } {
  const all = [...new Set([...modules, ...devel])].sort(compareVersions);
  if (all.length === 0) return {};
  if (all.length === 1) return { kernel: all[0]! };
  const both = all.filter((v) => modules.includes(v) && devel.includes(v));
  const kernel = (both.length ? both : all).at(-1)!;
  return { kernel, choice: `kernel ${kernel} of ${all.join(', ')}: ${both.length ? 'the newest with both modules and a kernel-devel tree' : 'the newest'}` };
}

async function kernelDirs(tree: TreeReader, dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const name of await tree.list(dir)) {
    if (KERNEL_NAME.test(name) && (await tree.stat(`${dir}/${name}`, true))?.type === 'directory') out.push(name);
  }
  return out;
}

export async function probeRoot(tree: TreeReader): Promise<RootProbe> {
  let elf: RootProbe['elf'];
  for (const path of ELF_CANDIDATES) {
    const head = await tree.head(path, ELF_HEADER_PREFIX);
    const ident = head && parseElfIdent(head);
    if (!ident) continue;
    const architecture = elfArchitecture(ident);
    elf = { path, ident, ...(architecture ? { architecture } : {}) };
    break;
  }

  const modules = await kernelDirs(tree, 'lib/modules');
  const devel = [...new Set((await kernelDirs(tree, 'usr/src/kernels')).map((n) => n.replace(DEVEL_ARCH_SUFFIX, '')))];
  const { kernel, choice } = chooseKernel(modules, devel);

  const firstLine = (b: Buffer | undefined) => b?.toString('utf8').split('\n')[0]!.trim() || undefined;
  let release = firstLine(await tree.head('etc/redhat-release', TEXT_LIMIT));
  if (!release) {
    const os = await tree.head('etc/os-release', TEXT_LIMIT);
    release = os ? parseOsRelease(os.toString('utf8')).PRETTY_NAME?.trim() || undefined : undefined;
  }

  const shell = (await tree.stat('bin/bash', true))?.type === 'file' ? '/bin/bash' : '/bin/sh';
  let binDir = true;
  for (const p of ['usr', 'usr/local', 'usr/local/bin']) binDir &&= (await tree.stat(p, false))?.type === 'directory';
  const uname = {
    exists: (await tree.stat('usr/local/bin/uname', false)) !== undefined,
    binDir,
    mtimeNs: (await tree.stat('bin/uname', true))?.mtimeNs ?? 0n,
  };

  return {
    ...(elf ? { elf } : {}),
    modules,
    devel,
    ...(kernel ? { kernel } : {}),
    ...(choice ? { kernelChoice: choice } : {}),
    ...(release ? { release } : {}),
    shell,
    uname,
  };
}

/** The architecture the image gets: the one asked for, else the detected one, else amd64. */
export function probedArchitecture(probe: RootProbe, input: string, explicit?: Architecture): Architecture {
  if (explicit) return explicit;
  if (!probe.elf) return 'amd64';
  if (probe.elf.architecture) return probe.elf.architecture;
  const { EI_CLASS, e_machine } = probe.elf.ident;
  throw new InputError(input, `/${probe.elf.path} is a ${EI_CLASS === 1 ? '32' : '64'}-bit ELF file for e_machine ${e_machine}, not x86 (3) or x86_64 (62): a DDK root is linux/386 or linux/amd64`);
}

/** A sentence for the stage's note: what was detected, from where. */
export function describeProbe(probe: RootProbe, architecture: Architecture): string {
  const from = probe.elf ? `from /${probe.elf.path}` : `assumed: none of /${ELF_CANDIDATES.join(', /')} is an ELF file`;
  const kernel = probe.kernelChoice ?? (probe.kernel ? `kernel ${probe.kernel}` : 'no kernel under /lib/modules or /usr/src/kernels');
  return `linux/${architecture} (${from}); ${kernel}`;
}

/** Labels the image gets from the probe (other helpers read exactly these names). */
export const FIT_LABELS = {
  platform: 'ddk2docker.platform',
  kernel: 'ddk2docker.kernel',
  release: 'ddk2docker.release',
  unameShim: 'ddk2docker.uname-shim',
} as const;

export const KERNEL_ENV = 'DDK_KERNEL_VERSION';
/** Docker's default PATH for a container whose image sets none: /usr/local/bin comes before /bin. */
export const DEFAULT_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

/** What the image config gets from the probe: `changes` go before the user's --change list, so those win. */
export interface ImageFit {
  architecture: Architecture;
  platform: string;
  kernel?: string;
  release?: string;
  labels: Record<string, string>;
  changes: string[];
}

export function imageFit(probe: RootProbe, opts: { input: string; architecture?: Architecture; changes: readonly string[]; unameShim: boolean }): ImageFit {
  const architecture = probedArchitecture(probe, opts.input, opts.architecture);
  const platform = `linux/${architecture}`;
  const labels: Record<string, string> = {
    [FIT_LABELS.platform]: platform,
    ...(probe.kernel ? { [FIT_LABELS.kernel]: probe.kernel } : {}),
    ...(probe.release ? { [FIT_LABELS.release]: probe.release } : {}),
    ...(opts.unameShim ? { [FIT_LABELS.unameShim]: UNAME_SHIM_PATH } : {}),
  };
  const changes: string[] = [];
  if (probe.kernel) changes.push(`ENV ${KERNEL_ENV}=${probe.kernel}`);
  if (opts.unameShim) changes.push(`ENV PATH=${DEFAULT_PATH}`);
  // The user's CMD or ENTRYPOINT wins; adding ours to theirs would change what ENTRYPOINT does to Cmd.
  const user = applyChanges({}, opts.changes);
  if (user.Cmd === undefined && user.Entrypoint === undefined) changes.push(`CMD ${JSON.stringify([probe.shell])}`);
  if (opts.unameShim) {
    const path = applyChanges({}, [...changes, ...opts.changes]).Env?.find((e) => e.startsWith('PATH='))?.slice(5) ?? '';
    const dirs = path.split(':');
    const local = dirs.indexOf('/usr/local/bin');
    const bin = dirs.indexOf('/bin');
    if (local === -1 || (bin !== -1 && bin < local)) {
      throw new InputError('--uname-shim', `the image's PATH ${JSON.stringify(path)} does not look in /usr/local/bin before /bin, so uname would not be the shim`);
    }
  }
  return { architecture, platform, ...(probe.kernel ? { kernel: probe.kernel } : {}), ...(probe.release ? { release: probe.release } : {}), labels, changes };
}
