import { readdir } from 'node:fs/promises';
import { PassThrough, type Readable } from 'node:stream';
import { CancelledError, InputError } from '../errors.js';
import { ExtFileSystem } from '../formats/ext/index.js';
import { appendToTar, packTree, type AddedFile } from '../formats/tar.js';
import { tool, toolError } from '../host/exec.js';
import { mount, mountPoint } from '../host/mounts.js';
import type { MappedRoot } from './map.js';
import { readOnlyOptions } from './map.js';
import { extTree, mountTree, probeRoot, type RootProbe, type TreeReader } from './probe.js';
import type { StageContext } from './stage.js';

/** export: the root file system as one tar stream; `done` settles when the producer has finished. */
export interface Layer {
  stream: Readable;
  done: Promise<void>;
}

export interface ExportedLayer extends Layer {
  /** What the tree says about the image that fits it, read before the tar starts. */
  probe: RootProbe;
}

export interface ExportOptions {
  /** Names the tree in messages (default: the partition). */
  input?: string;
  /** Given the probe before the tar starts: files to add after the tree (the uname shim); may refuse by throwing. */
  extra?: (probe: RootProbe) => AddedFile[];
}

/** Probe, then ask for the extra files: both before a single byte of the tar is made. */
async function prepare(tree: TreeReader, opts: ExportOptions): Promise<{ probe: RootProbe; files: AddedFile[] }> {
  const probe = await probeRoot(tree);
  return { probe, files: opts.extra?.(probe) ?? [] };
}

/**
 * GNU tar flags for a faithful, reproducible archive: numeric owners, every xattr (file
 * capabilities live in security.capability), pax for nanosecond mtimes and long names, sorted
 * names, and no atime/ctime or pid-bearing header names that would change between runs.
 */
export const GNU_TAR_ARGS = [
  '--numeric-owner',
  '--xattrs',
  '--xattrs-include=*',
  '--format=posix',
  '--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime',
  '--sort=name',
  '--one-file-system',
];

async function hostExport(ctx: StageContext, root: MappedRoot, input: string, opts: ExportOptions): Promise<ExportedLayer> {
  const dir = await mountPoint(ctx.workdir, ctx.cleanup, 'root');
  const fsType = root.fsType ?? 'ext4';
  const unmount = await mount(ctx.cleanup, { device: root.device!, dir, type: fsType, options: readOnlyOptions(fsType), signal: ctx.signal, what: `mount ${root.device!}` }).catch((err: Error) => {
    throw err instanceof CancelledError ? err : new InputError(root.input, `cannot mount its ${fsType}: ${err.message.replace(/^mount \S+: (mount: \S+: )?/, '')}`, { cause: err });
  });
  // Reading the mount fails on a corrupt inode: that names the partition, as tar's failures do.
  const { probe, files } = await prepare(mountTree(dir, root.input), opts);
  // The root as "./" and everything else without the "./" prefix, as the builtin writer names
  // entries: both engines then give byte-identical layers, hence one diffID. Names go through
  // stdin, NUL-separated and verbatim, so none can be taken for an option.
  const top = (await readdir(dir, { encoding: 'buffer' })).sort(Buffer.compare);
  const names = Buffer.concat(top.flatMap((n) => [n, Buffer.alloc(1)]));
  const argv = [...GNU_TAR_ARGS, '-C', dir, '-cf', '-', '--no-recursion', '.', '--recursion', '--null', '--verbatim-files-from', '--files-from=-'];
  const tar = tool('tar', argv, { signal: ctx.signal, encoding: 'buffer', buffer: { stdout: false }, input: names });
  // execa's stdout starts flowing at once: hand it to a stream of ours before the consumer is ready.
  const tarStream = tar.stdout!.pipe(new PassThrough({ highWaterMark: 1 << 20 }));
  const stream = files.length ? appendToTar(tarStream, files, { signal: ctx.signal, input }) : tarStream;
  const done = (async () => {
    try {
      await tar;
    } catch (err) {
      const e = toolError(err, 'tar');
      throw e instanceof CancelledError ? e : new InputError(root.input, e.message.replace(/^tar: tar: /, 'tar: '), { cause: err });
    }
    await unmount();
  })();
  done.catch((err: unknown) => stream.destroy(err as Error));
  return { stream, done, probe };
}

async function builtinExport(ctx: StageContext, root: MappedRoot, input: string, opts: ExportOptions): Promise<ExportedLayer> {
  const fs = await ExtFileSystem.open(root.source!);
  const { probe, files } = await prepare(extTree(fs), opts);
  const packed = packTree(fs.walk({ signal: ctx.signal }), (e) => fs.readFileNow(e) ?? fs.readFile(e, { signal: ctx.signal }), { signal: ctx.signal, input: root.source!.name });
  // The same appender as the host engine's, so that both still give byte-identical layers.
  const stream = files.length ? appendToTar(packed.stream, files, { signal: ctx.signal, input }) : packed.stream;
  return { stream, done: packed.done.then(() => undefined), probe };
}

export async function exportRoot(ctx: StageContext, root: MappedRoot, opts: ExportOptions = {}): Promise<ExportedLayer> {
  const input = opts.input ?? root.source?.name ?? `partition ${root.index}`;
  return ctx.engine === 'builtin' ? builtinExport(ctx, root, input, opts) : hostExport(ctx, root, input, opts);
}
