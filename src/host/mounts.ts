import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { throwIfAborted } from '../errors.js';
import type { Cleanup } from '../pipeline/cleanup.js';
import { run } from './exec.js';

/** Mount points and loop devices the host engine makes, each undone by the run's cleanup. */

async function isMounted(dir: string): Promise<boolean> {
  const mounts = await readFile('/proc/mounts', 'utf8');
  // /proc/mounts escapes spaces and such as octal.
  const escaped = dir.replace(/[ \t\n\\]/g, (c) => `\\${c.charCodeAt(0).toString(8).padStart(3, '0')}`);
  return mounts.split('\n').some((l) => l.split(' ')[1] === escaped);
}

/** Unmount, retrying while busy (a tar just killed may still hold files), then lazily. */
export async function unmount(dir: string, fuse = false): Promise<void> {
  for (let attempt = 0; attempt < 10 && (await isMounted(dir)); attempt++) {
    try {
      if (fuse) await run('fusermount', ['-u', dir], `unmount ${dir}`);
      else await run('umount', [dir], `unmount ${dir}`);
    } catch (err) {
      if (attempt === 9) throw err;
      await new Promise((r) => setTimeout(r, 200 * (attempt + 1)));
    }
  }
  if (await isMounted(dir)) await run(fuse ? 'fusermount' : 'umount', fuse ? ['-uz', dir] : ['-l', dir], `lazy unmount ${dir}`);
}

/** A fresh mount point under the workdir; registered so it is removed after its unmount. */
export async function mountPoint(workdir: string, cleanup: Cleanup, prefix: string): Promise<string> {
  const dir = await mkdtemp(join(workdir, `${prefix}-`));
  cleanup.defer(`remove ${dir}`, () => rm(dir, { recursive: true, force: true }));
  return dir;
}

/**
 * Mount and register the unmount. The mount call itself is not cancelled: a mount(8) killed
 * mid-call may still leave a mount behind that nobody would undo; it is quick, so the run's abort
 * is honoured right after it.
 */
export async function mount(
  cleanup: Cleanup,
  args: { device: string; dir: string; type?: string; options: string[]; signal?: AbortSignal; what: string },
): Promise<() => Promise<void>> {
  const argv = [...(args.type ? ['-t', args.type] : []), '-o', args.options.join(','), args.device, args.dir];
  const undo = cleanup.defer(`unmount ${args.dir}`, () => unmount(args.dir));
  await run('mount', argv, args.what);
  throwIfAborted(args.signal);
  return undo;
}

/** Attach a read-only loop device over a byte range of a file (kpartx's job where there is no device-mapper). */
export async function attachLoop(
  cleanup: Cleanup,
  file: string,
  range: { offset: number; size: number } | undefined,
  signal?: AbortSignal,
): Promise<{ device: string; detach: () => Promise<void> }> {
  const argv = ['--find', '--show', '--read-only'];
  if (range) argv.push('--offset', String(range.offset), '--sizelimit', String(range.size));
  argv.push(file);
  // Not cancelled mid-call, like mount: the device it attaches must be known to be detached.
  const device = (await run('losetup', argv, `losetup ${file}`)).trim();
  if (!/^\/dev\/loop\d+$/.test(device)) throw new Error(`losetup ${file}: unexpected answer ${JSON.stringify(device)}`);
  const detach = cleanup.defer(`detach ${device}`, () => detachLoop(device));
  throwIfAborted(signal);
  return { device, detach };
}

async function detachLoop(device: string): Promise<void> {
  for (let attempt = 0; attempt < 10; attempt++) {
    try {
      await run('losetup', ['--detach', device], `losetup --detach ${device}`);
      return;
    } catch (err) {
      if (/No such device|not found|failed to get/i.test((err as Error).message)) return;
      if (attempt === 9) throw err;
      await new Promise((r) => setTimeout(r, 200 * (attempt + 1)));
    }
  }
}
