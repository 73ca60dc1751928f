import { readFile } from 'node:fs/promises';
import { ExecaError } from 'execa';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { CancelledError, InputError } from '../errors.js';
import { packTree, readTar, type TarHeader, type TreeEntry, type TreeEntryType } from '../formats/tar.js';
import { tool, toolError } from '../host/exec.js';
import { displayPath } from '../manifest.js';
import { Digester } from '../stream-sha256.js';

/**
 * Unpacking the layer tar into a directory, for outputs that are a file tree. GNU tar writes the
 * tree (nanosecond mtimes, xattrs, device nodes, owners: nothing in Node sets all of those), but
 * only after our own guard has read every entry: names from the image are data, so the guard
 * rejects anything that could write outside the root — a ".." component, a path under a symlink
 * or any other non-directory of the layer, a hard link to something not already in the tree, a
 * name given twice (a second entry could replace a directory by a symlink) — and GNU tar receives
 * the checked entries re-encoded by our writer. GNU tar's own defences (it refuses ".." and
 * defers symlinks that point outside until the end) stay on as a second line.
 */

/** What the running process may do to the tree, from its effective capabilities. */
export interface Privileges {
  /** CAP_CHOWN: keep the image's owners. */
  chown: boolean;
  /** CAP_MKNOD: make device nodes. */
  mknod: boolean;
  /** CAP_SETFCAP: set security.capability (file capabilities). */
  setfcap: boolean;
  /** CAP_SYS_ADMIN: set trusted.* and the other security.* xattrs. */
  sysAdmin: boolean;
}

const CAP_CHOWN = 0;
const CAP_SYS_ADMIN = 21;
const CAP_MKNOD = 27;
const CAP_SETFCAP = 31;

export async function privileges(): Promise<Privileges> {
  const status = await readFile('/proc/self/status', 'utf8').catch(() => '');
  const hex = /^CapEff:\s*([0-9a-f]+)$/m.exec(status)?.[1];
  const effective = hex ? BigInt(`0x${hex}`) : 0n;
  const has = (bit: number) => ((effective >> BigInt(bit)) & 1n) === 1n;
  return { chown: has(CAP_CHOWN), mknod: has(CAP_MKNOD), setfcap: has(CAP_SETFCAP), sysAdmin: has(CAP_SYS_ADMIN) };
}

export interface Unpacked {
  /** sha256:… of the layer tar as received. */
  diffId: string;
  layerBytes: number;
  /** Entries written. */
  entries: number;
  /** False without CAP_CHOWN: every entry then belongs to the user who ran the conversion. */
  ownersPreserved: boolean;
  /** Device nodes (and hard links to them) left out for want of CAP_MKNOD. */
  devicesSkipped: number;
  /** xattrs left out for want of CAP_SETFCAP (security.capability) or CAP_SYS_ADMIN (trusted.*, other security.*). */
  xattrsSkipped: number;
}

export interface UnpackOptions {
  signal?: AbortSignal;
  onProgress?: (bytes: number) => void;
  /** Names the layer in error messages. */
  input: string;
  privileges: Privileges;
}

/** A path the guard has seen: an entry of the layer, or a directory implied by an entry below it. */
type Seen =
  | { kind: 'directory'; explicit: boolean }
  | { kind: 'other'; type: TreeEntryType; ino: number }
  | { kind: 'skipped' };

type Entry = TreeEntry & { data: AsyncIterable<Buffer> };

/** The per-entry checks, and the re-encoding of what passes them. */
class Guard {
  private readonly seen = new Map<string, Seen>();
  private nextIno = 1;
  entries = 0;
  devicesSkipped = 0;
  xattrsSkipped = 0;

  constructor(private readonly input: string, private readonly privileges: Privileges) {}

  private reject(path: Buffer, problem: string): never {
    throw new InputError(this.input, `entry ${JSON.stringify(displayPath(path))} ${problem}`);
  }

  /** The entry to hand to GNU tar, or undefined when it is left out. */
  admit(h: TarHeader, data: AsyncIterable<Buffer>): Entry | undefined {
    const key = h.path.toString('latin1');
    this.checkName(h.path);
    this.checkParents(h.path);
    const before = this.seen.get(key);
    if (before) {
      const impliedDirectory = before.kind === 'directory' && !before.explicit;
      if (!impliedDirectory) this.reject(h.path, 'appears twice in the layer');
      if (h.type !== 'directory') this.reject(h.path, `is a ${h.type}, but earlier entries lie below it`);
    }
    if (h.path.length === 0 && h.type !== 'directory') this.reject(h.path, `is the root, but a ${h.type}`);
    const device = h.type === 'character-device' || h.type === 'block-device';
    if (device && !this.privileges.mknod) {
      this.seen.set(key, { kind: 'skipped' });
      this.devicesSkipped++;
      return undefined;
    }
    const entry: Entry = {
      path: h.path, type: h.type === 'hardlink' ? 'file' : h.type, mode: h.mode, uid: h.uid, gid: h.gid, size: h.size,
      // A hard link's xattrs are its target's, set with the target.
      mtimeNs: h.mtimeNs, xattrs: h.type === 'hardlink' ? new Map() : this.keptXattrs(h.xattrs), data, ino: 0, nlink: 2,
    };
    switch (h.type) {
      case 'directory':
        this.seen.set(key, { kind: 'directory', explicit: true });
        break;
      case 'hardlink': {
        // The target must already be in the tree: then the link cannot reach outside it.
        const target = this.seen.get(h.linkname.toString('latin1'));
        if (target?.kind === 'skipped') {
          this.seen.set(key, target);
          this.devicesSkipped++;
          return undefined;
        }
        if (target?.kind !== 'other') this.reject(h.path, `is a hard link to ${JSON.stringify(displayPath(h.linkname))}, which is not an earlier non-directory entry of the layer`);
        // Our writer turns an entry sharing an earlier entry's inode into a hard link to it.
        entry.type = target.type;
        entry.ino = target.ino;
        this.seen.set(key, target);
        break;
      }
      default:
        entry.ino = this.nextIno++;
        this.seen.set(key, { kind: 'other', type: entry.type, ino: entry.ino });
    }
    if (h.type === 'symlink') entry.symlinkTarget = h.linkname;
    if (device) {
      entry.devmajor = h.devmajor;
      entry.devminor = h.devminor;
    }
    this.entries++;
    return entry;
  }

  /** A plain relative name: no empty, "." or ".." component, no NUL (a leading "/" is already gone). */
  private checkName(path: Buffer): void {
    if (path.includes(0)) this.reject(path, 'has a NUL byte in its name');
    if (path.length === 0) return;
    for (const part of split(path)) {
      if (part.length === 0) this.reject(path, 'has an empty path component');
      if (part.equals(DOT) || part.equals(DOTDOT)) this.reject(path, `has a ${JSON.stringify(part.toString())} path component: it could land outside the root`);
    }
  }

  /** Every parent must be a directory of the layer (or implied by it), never a symlink or a file. */
  private checkParents(path: Buffer): void {
    for (let i = path.indexOf(0x2f); i !== -1; i = path.indexOf(0x2f, i + 1)) {
      const parent = path.subarray(0, i);
      const seen = this.seen.get(parent.toString('latin1'));
      if (!seen) this.seen.set(parent.toString('latin1'), { kind: 'directory', explicit: false });
      else if (seen.kind === 'other') this.reject(path, `lies below ${JSON.stringify(displayPath(parent))}, which is a ${seen.type}${seen.type === 'symlink' ? ': writing through it could land outside the root' : ''}`);
      else if (seen.kind === 'skipped') this.reject(path, `lies below ${JSON.stringify(displayPath(parent))}, which is a device node`);
    }
  }

  private keptXattrs(xattrs: Map<string, Buffer>): Map<string, Buffer> {
    const kept = new Map<string, Buffer>();
    for (const [name, value] of xattrs) {
      const allowed = name === 'security.capability' ? this.privileges.setfcap
        : name.startsWith('security.') || name.startsWith('trusted.') ? this.privileges.sysAdmin
        : true;
      if (allowed) kept.set(name, value);
      else this.xattrsSkipped++;
    }
    return kept;
  }
}

const DOT = Buffer.from('.');
const DOTDOT = Buffer.from('..');

function split(path: Buffer): Buffer[] {
  const parts: Buffer[] = [];
  let start = 0;
  for (let i = 0; i <= path.length; i++) {
    if (i === path.length || path[i] === 0x2f) {
      parts.push(path.subarray(start, i));
      start = i + 1;
    }
  }
  return parts;
}

/**
 * readTar pushes entries, the writer pulls them, one at a time: readTar moves on only when the
 * writer asks for the next entry, so the entry's data (read straight from the layer) has been
 * taken. If the writer stops early, the waiting producer is refused and readTar stops too.
 */
function relay<T>(produce: (push: (item: T) => Promise<void>) => Promise<void>): { items: AsyncGenerator<T>; done: Promise<void> } {
  let offered: { item: T; taken: () => void; refused: (err: Error) => void } | undefined;
  let wake: (() => void) | undefined;
  let finished = false;
  let stopped = false;
  const push = (item: T) =>
    new Promise<void>((taken, refused) => {
      if (stopped) return refused(new CancelledError('the tree writer stopped'));
      offered = { item, taken, refused };
      wake?.();
    });
  const done = produce(push).finally(() => {
    finished = true;
    wake?.();
  });
  async function* items(): AsyncGenerator<T> {
    let current: typeof offered;
    try {
      for (;;) {
        while (!offered && !finished) await new Promise<void>((r) => (wake = r));
        wake = undefined;
        current = offered;
        offered = undefined;
        if (!current) return await done;
        yield current.item;
        current.taken();
        current = undefined;
      }
    } finally {
      stopped = true;
      current?.refused(new CancelledError('the tree writer stopped'));
    }
  }
  return { items: items(), done };
}

function tarArgs(root: string, p: Privileges): string[] {
  return [
    '-x', '-f', '-', '-C', root,
    '--numeric-owner', '--xattrs', '--xattrs-include=*', '--same-permissions',
    p.chown ? '--same-owner' : '--no-same-owner',
    // Modes of read-only directories are set last, so their entries can still be written.
    '--delay-directory-restore',
    // Images have mtimes before 1970 and in the future: that is what they hold, not a problem.
    '--warning=no-timestamp',
  ];
}

/**
 * GNU tar's first complaint that names a system error ("NAME: Cannot write: No space left on
 * device"), else its first line: later lines are mostly consequences of the first.
 */
function tarError(err: unknown, root: string): Error {
  if (!(err instanceof ExecaError) || err.isCanceled || err.code === 'ENOENT') return toolError(err, `tar -x into ${root}`);
  const said = String(err.stderr ?? '').split('\n').filter((l) => l && !/Exiting with failure status/.test(l));
  const line = said.find((l) => /: Cannot [^:]+: /.test(l)) ?? said[0] ?? err.shortMessage;
  return new Error(`tar -x into ${root}: ${line}`, { cause: err });
}

/** Errors that are only echoes of another failure (a closed pipe, an abort), not its cause. */
function isEcho(err: unknown): boolean {
  const code = (err as { code?: string } | undefined)?.code;
  return err instanceof CancelledError || code === 'EPIPE' || code === 'ERR_STREAM_PREMATURE_CLOSE' || code === 'ABORT_ERR'
    || (err as Error | undefined)?.name === 'AbortError';
}

/**
 * Write the layer's tree into `root` (an existing empty directory), hashing the layer as it is
 * read. Throws on the first problem, after every part has stopped; `root` is then the caller's
 * to remove.
 */
export async function unpackLayer(layer: Readable, root: string, opts: UnpackOptions): Promise<Unpacked> {
  const stop = new AbortController();
  const onAbort = () => stop.abort(new CancelledError());
  opts.signal?.addEventListener('abort', onAbort, { once: true });
  if (opts.signal?.aborted) stop.abort(new CancelledError());
  const failures: unknown[] = [];
  const watch = <T>(task: Promise<T>): Promise<T> =>
    task.catch((err: unknown) => {
      failures.push(err);
      stop.abort(err);
      throw err;
    });

  const diff = new Digester(opts.onProgress);
  const guard = new Guard(opts.input, opts.privileges);
  const { items, done: read } = relay<Entry>((push) =>
    readTar(diff, opts.input, async (header, data) => {
      const entry = guard.admit(header, data);
      if (entry) await push(entry);
    }),
  );
  const packed = packTree(items, (e) => e.data, { signal: stop.signal, input: opts.input });
  const tar = tool('tar', tarArgs(root, opts.privileges), { signal: stop.signal, stdin: 'pipe', stdout: 'ignore', stderr: 'pipe' });
  stop.signal.addEventListener('abort', () => {
    diff.destroy();
    packed.stream.destroy();
  }, { once: true });

  const tasks = [
    watch(pipeline(layer, diff)),
    watch(read),
    watch(packed.done),
    watch(pipeline(packed.stream, tar.stdin!)),
    watch(tar.then(() => undefined, (err: unknown) => { throw tarError(err, root); })),
  ];
  try {
    await Promise.allSettled(tasks);
    if (opts.signal?.aborted) throw new CancelledError();
    // The first failure that is a cause, not an echo of another.
    if (failures.length) throw failures.find((e) => !isEcho(e)) ?? failures[0];
  } finally {
    opts.signal?.removeEventListener('abort', onAbort);
  }
  return {
    diffId: diff.digest(),
    layerBytes: diff.bytes,
    entries: guard.entries,
    ownersPreserved: opts.privileges.chown,
    devicesSkipped: guard.devicesSkipped,
    xattrsSkipped: guard.xattrsSkipped,
  };
}
