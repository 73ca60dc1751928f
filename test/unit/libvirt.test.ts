import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import tar from 'tar-stream';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { InputError } from '../../src/errors.js';
import { domainName, domainUuid } from '../../src/docker/libvirt.js';
import { writeOutput, type ImageMeta } from '../../src/docker/outputs.js';

/**
 * The libvirt-lxc output's unpacker against crafted layers: names from an image must never write
 * outside the output root, and a refused layer leaves neither DIR nor DIR.partial-* behind.
 */
type Spec = { name: string; type?: 'file' | 'directory' | 'symlink' | 'link'; linkname?: string; body?: string; mode?: number };

let work: string;
let outside: string;
let victim: string;
let parent: string;
const meta: ImageMeta = { architecture: 'amd64', config: {}, tag: 'crafted:1' };

function layer(entries: Spec[]): Readable {
  const pack = tar.pack();
  const mtime = new Date(1_500_000_000_000);
  for (const e of entries) {
    const type = e.type ?? 'file';
    const mode = e.mode ?? (type === 'directory' ? 0o755 : 0o644);
    const header = { name: e.name, type, mode, mtime, ...(e.linkname ? { linkname: e.linkname } : {}) };
    if (type === 'file') pack.entry(header, e.body ?? 'data\n');
    else pack.entry(header);
  }
  pack.finalize();
  return pack as unknown as Readable;
}

/** A shell to boot, so that only the entries under test can make a layer fail. */
const SHELL: Spec[] = [{ name: 'bin', type: 'directory' }, { name: 'bin/sh', mode: 0o755, body: '#!/bin/sh\n' }];

async function outsideState(): Promise<string> {
  return JSON.stringify([(await readdir(outside)).sort(), await readFile(victim, 'utf8')]);
}

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'ddk2docker-libvirt-'));
  outside = join(work, 'outside');
  await mkdir(outside);
  victim = join(outside, 'victim');
  await writeFile(victim, 'untouched\n');
  await writeFile(join(outside, 'init'), '#!/bin/sh\n', { mode: 0o755 });
});

afterAll(async () => {
  await rm(work, { recursive: true, force: true });
});

beforeEach(async () => {
  parent = await mkdtemp(join(work, 'out-'));
});

describe('a crafted layer never writes outside DIR', () => {
  const CASES: [string, Spec[], RegExp][] = [
    ['a ".." component', [{ name: '../escape' }], /entry "\.\.\/escape" has a "\.\." path component/],
    ['".." deeper down', [{ name: 'etc', type: 'directory' }, { name: 'etc/../../escape' }], /"\.\." path component/],
    ['a write through a symlink to an absolute path', [{ name: 'a', type: 'symlink', linkname: '@OUTSIDE' }, { name: 'a/passwd' }], /entry "a\/passwd" lies below "a", which is a symlink/],
    ['a write through a symlink going up', [{ name: 'b', type: 'symlink', linkname: '../../../..' }, { name: 'b/escape' }], /lies below "b", which is a symlink/],
    ['a write through a chain of symlinks', [{ name: 'd', type: 'symlink', linkname: '@OUTSIDE' }, { name: 'c', type: 'symlink', linkname: 'd' }, { name: 'c/escape' }], /lies below "c", which is a symlink/],
    ['a hard link to an absolute path', [{ name: 'h', type: 'link', linkname: '@VICTIM' }], /entry "h" is a hard link to ".*outside\/victim", which is not an earlier non-directory entry/],
    ['a hard link going up', [{ name: 'h', type: 'link', linkname: '../../outside/victim' }], /is a hard link to .*not an earlier non-directory entry/],
    ['a file over a symlink to a file outside', [{ name: 's', type: 'symlink', linkname: '@VICTIM' }, { name: 's', body: 'overwritten\n' }], /entry "s" appears twice/],
    ['a directory over a symlink', [{ name: 't', type: 'symlink', linkname: '@OUTSIDE' }, { name: 't', type: 'directory' }, { name: 't/escape' }], /entry "t" appears twice/],
    ['a symlink replacing a directory that holds entries', [{ name: 'x/y' }, { name: 'x', type: 'symlink', linkname: '@OUTSIDE' }], /entry "x" is a symlink, but earlier entries lie below it/],
  ];

  it.each(CASES)('%s: refused, nothing left', async (_name, specs, message) => {
    const before = await outsideState();
    const entries = [...SHELL, ...specs].map((s) => ({
      ...s,
      ...(s.linkname ? { linkname: s.linkname.replace('@OUTSIDE', outside).replace('@VICTIM', victim) } : {}),
    }));
    const dir = join(parent, 'dom');
    const error = await writeOutput({ kind: 'libvirt-lxc', path: dir }, layer(entries), meta).then(() => undefined, (e: unknown) => e);
    expect(error).toBeInstanceOf(InputError);
    expect((error as Error).message).toMatch(message);
    expect(await outsideState()).toBe(before);
    expect(await readdir(parent)).toEqual([]);
  });

  it('an absolute name is taken as relative to DIR/rootfs', async () => {
    const before = await outsideState();
    const dir = join(parent, 'dom');
    const r = await writeOutput({ kind: 'libvirt-lxc', path: dir }, layer([...SHELL, { name: `${outside}/abs`, body: 'inside\n' }]), meta);
    expect(await outsideState()).toBe(before);
    expect(await readFile(join(dir, 'rootfs', outside, 'abs'), 'utf8')).toBe('inside\n');
    expect(await readdir(parent)).toEqual(['dom']);
    expect(r.libvirt?.init).toBe('/bin/sh');
  });
});

describe('the init the domain boots', () => {
  const initOf = async (specs: Spec[]): Promise<string | undefined> => {
    const dir = join(parent, 'dom');
    const r = await writeOutput({ kind: 'libvirt-lxc', path: dir }, layer(specs), meta);
    return r.libvirt?.init;
  };

  it('is /sbin/init when it resolves, through symlinks, to an executable inside the tree', async () => {
    expect(await initOf([...SHELL, { name: 'lib/systemd/systemd', mode: 0o755 }, { name: 'sbin', type: 'directory' }, { name: 'sbin/init', type: 'symlink', linkname: '../lib/systemd/systemd' }])).toBe('/sbin/init');
  });

  it.each([
    ['absolute, to a host file', () => join(outside, 'init')],
    ['going up past the root', () => `../../../../../../..${join(outside, 'init')}`],
  ])('is a shell when /sbin/init is a symlink out of the tree (%s): the host file is never looked at', async (_name, target) => {
    expect(await initOf([...SHELL, { name: 'sbin', type: 'directory' }, { name: 'sbin/init', type: 'symlink', linkname: target() }])).toBe('/bin/sh');
  });

  it('is a shell when /sbin/init is not executable', async () => {
    expect(await initOf([...SHELL, { name: 'sbin/init', mode: 0o644 }])).toBe('/bin/sh');
  });

  it('missing altogether fails the output, naming DIR, and leaves nothing', async () => {
    const dir = join(parent, 'dom');
    await expect(writeOutput({ kind: 'libvirt-lxc', path: dir }, layer([{ name: 'etc/motd' }]), meta)).rejects.toThrow(`${dir}: the root file system has none of /sbin/init, /bin/bash, /bin/sh as an executable file`);
    expect(await readdir(parent)).toEqual([]);
  });
});

describe('domain names', () => {
  it.each([
    [{ tag: 'xs65ddk:latest' }, 'xs65ddk-latest'],
    [{ tag: 'registry.example:5000/ddk/dom0:8.2.1' }, 'registry.example-5000-ddk-dom0-8.2.1'],
    [{ source: 'XenServer-6.5.0-DDK.iso' }, 'XenServer-6.5.0-DDK'],
    [{ source: 'a b/<c>&"d".iso' }, 'a-b-c-d'],
    [{ source: '2024.iso' }, 'ddk-2024'],
    [{}, 'ddk'],
  ])('%j gives %s', (from: { tag?: string; source?: string }, name) => {
    expect(domainName({ architecture: 'amd64', config: from.source ? { Labels: { 'ddk2docker.source.name': from.source } } : {}, ...(from.tag ? { tag: from.tag } : {}) })).toBe(name);
  });
});

describe('domain UUIDs', () => {
  const diffId = `sha256:${'ab'.repeat(32)}`;
  it('are RFC 4122 version 5, the same for the same layer, place and name', () => {
    const uuid = domainUuid(diffId, '/srv/lxc/ddk', 'ddk');
    expect(uuid).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    expect(domainUuid(diffId, '/srv/lxc/ddk', 'ddk')).toBe(uuid);
  });

  it('differ for another place, name or layer: such domains can be defined side by side', () => {
    const uuid = domainUuid(diffId, '/srv/lxc/ddk', 'ddk');
    expect(domainUuid(diffId, '/srv/lxc/ddk2', 'ddk')).not.toBe(uuid);
    expect(domainUuid(diffId, '/srv/lxc/ddk', 'ddk2')).not.toBe(uuid);
    expect(domainUuid(`sha256:${'cd'.repeat(32)}`, '/srv/lxc/ddk', 'ddk')).not.toBe(uuid);
  });
});
