import { createReadStream } from 'node:fs';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { PassThrough, type Readable } from 'node:stream';
import { InputError } from '../errors.js';
import type { Cleanup } from '../pipeline/cleanup.js';
import { run, tool } from './exec.js';
import type { IsoMethod } from './facilities.js';
import { mount, mountPoint, unmount } from './mounts.js';

/** The files of an ISO as the host engine reaches them: a kernel or FUSE mount, or bsdtar. */
export interface HostIso {
  method: IsoMethod;
  /** Names in a directory ('' for none). */
  list(dir: string): Promise<string[]>;
  readFile(path: string): Promise<Buffer>;
  open(path: string): Readable;
  /** A file system path of an ISO file, when the ISO is mounted. */
  pathOf(path: string): string | undefined;
}

export async function openHostIso(
  iso: string,
  method: IsoMethod,
  ctx: { cleanup: Cleanup; workdir: string; signal: AbortSignal },
): Promise<HostIso> {
  if (method === 'bsdtar') return bsdtarIso(iso, ctx.signal);
  const dir = await mountPoint(ctx.workdir, ctx.cleanup, 'iso');
  if (method === 'kernel') {
    await mount(ctx.cleanup, { device: iso, dir, type: 'iso9660', options: ['loop', 'ro', 'nodev', 'nosuid', 'noexec'], signal: ctx.signal, what: `mount ${iso}` }).catch((err: Error) => {
      throw new InputError(iso, `cannot mount as ISO 9660: ${err.message}`);
    });
  } else {
    ctx.cleanup.defer(`unmount ${dir}`, () => unmount(dir, true));
    // Read-only, nothing on it runs or counts as a device or setuid (FUSE adds nosuid,nodev for
    // non-root users only); -n: no $HOME/.mtab.fuseiso, which concurrent runs would share.
    await run('fuseiso', ['-n', iso, dir, '-o', 'ro,noexec,nosuid,nodev'], `fuseiso ${iso}`);
  }
  const at = (p: string) => join(dir, p);
  return {
    method,
    list: async (d) => readdir(at(d)).catch(() => []),
    readFile: (p) => readFile(at(p)),
    open: (p) => createReadStream(at(p), { highWaterMark: 1 << 20 }),
    pathOf: at,
  };
}

function bsdtarIso(iso: string, signal: AbortSignal): HostIso {
  let listing: Promise<string[]> | undefined;
  const entries = () =>
    (listing ??= run('bsdtar', ['-tf', iso], `bsdtar -tf ${iso}`, { signal }).then((out) =>
      out.split('\n').filter(Boolean).map((p) => p.replace(/\/$/, '')),
    ));
  return {
    method: 'bsdtar',
    list: async (d) => {
      const prefix = d ? `${d}/` : '';
      return (await entries()).filter((p) => p.startsWith(prefix) && p.length > prefix.length && !p.slice(prefix.length).includes('/')).map((p) => p.slice(prefix.length));
    },
    readFile: async (p) => {
      const r = await tool('bsdtar', ['-xOf', iso, p], { signal, encoding: 'buffer' });
      return Buffer.from(r.stdout as Uint8Array);
    },
    // execa's stdout flows at once: pass it into a stream of ours before anyone reads it.
    open: (p) => tool('bsdtar', ['-xOf', iso, p], { signal, encoding: 'buffer', buffer: false }).stdout!.pipe(new PassThrough()),
    pathOf: () => undefined,
  };
}
