import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { lstat, mkdir, mkdtemp, readdir, readFile, readlink, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { gunzipSync } from 'node:zlib';
import { execa } from 'execa';
import tar from 'tar-stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CancelledError, InputError } from '../../src/errors.js';
import { readTar } from '../../src/formats/tar.js';
import { tarHeader } from '../../src/docker/archive.js';
import { applyChanges, canonicalJson, defaultCreated, imageConfig, parseTag, type ContainerConfig } from '../../src/docker/image.js';
import { parseOutput, writeOutput, type ImageMeta, type Output } from '../../src/docker/outputs.js';

const RANDOM_SIZE = 20 * 1024 * 1024;
let work: string;
let layerPath: string;
let layerDigest: string;
let layerSize: number;
let random: Buffer;

const sha256 = (data: Buffer): string => `sha256:${createHash('sha256').update(data).digest('hex')}`;
const layer = (): Readable => createReadStream(layerPath);

const meta: ImageMeta = {
  architecture: 'amd64',
  config: { Cmd: ['/bin/bash'], Labels: { 'org.example.release': '8.2' }, Env: ['PATH=/usr/sbin:/usr/bin:/sbin:/bin'] },
  tag: 'ddk:8.2',
};

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'ddk2docker-outputs-'));
  layerPath = join(work, 'layer.tar');
  random = randomBytes(RANDOM_SIZE);
  const pack = tar.pack();
  const mtime = new Date(1_500_000_000_000);
  pack.entry({ name: 'etc', type: 'directory', mode: 0o755, mtime });
  pack.entry({ name: 'etc/hello', mode: 0o644, mtime }, 'hello world\n');
  pack.entry({ name: 'etc/hello.hard', type: 'link', linkname: 'etc/hello', mtime });
  pack.entry({ name: 'etc/link', type: 'symlink', linkname: 'hello', mtime });
  pack.entry({ name: 'usr', type: 'directory', mode: 0o755, mtime });
  pack.entry({ name: 'usr/bin', type: 'directory', mode: 0o755, mtime });
  pack.entry({ name: 'usr/bin/tool', mode: 0o755, mtime }, '#!/bin/sh\necho tool\n');
  pack.entry({ name: 'data', type: 'directory', mode: 0o755, mtime });
  pack.entry({ name: 'data/random.bin', mode: 0o600, mtime }, random);
  pack.finalize();
  await pipeline(pack, createWriteStream(layerPath));
  const bytes = await readFile(layerPath);
  layerDigest = sha256(bytes);
  layerSize = bytes.length;
});

afterAll(async () => {
  await rm(work, { recursive: true, force: true });
});

/** A fresh empty directory for one test's outputs. */
async function scratch(name: string): Promise<string> {
  const dir = join(work, name);
  await mkdir(dir);
  return dir;
}

describe('parseOutput', () => {
  it('parses every form', () => {
    expect(parseOutput('docker')).toEqual({ kind: 'docker' });
    expect(parseOutput('docker-archive:out/ddk.tar')).toEqual({ kind: 'docker-archive', path: 'out/ddk.tar' });
    expect(parseOutput('oci:/srv/layout')).toEqual({ kind: 'oci', path: '/srv/layout', gzip: false });
    expect(parseOutput('rootfs:ddk.tar')).toEqual({ kind: 'rootfs', path: 'ddk.tar', gzip: false });
    expect(parseOutput('rootfs:/var/lib/vz/template/cache/ddk.tar.gz')).toEqual({ kind: 'rootfs', path: '/var/lib/vz/template/cache/ddk.tar.gz', gzip: true });
    expect(parseOutput('libvirt-lxc:/var/lib/ddk/xs65')).toEqual({ kind: 'libvirt-lxc', path: '/var/lib/ddk/xs65' });
    // Everything after the first colon is the path.
    expect(parseOutput('oci:a:b')).toEqual({ kind: 'oci', path: 'a:b', gzip: false });
  });

  it.each(['', 'dockr', 'docker:', 'docker-archive:', 'oci:', 'rootfs:ddk.tgz', 'rootfs:ddk', 'tar:x.tar', 'docker-daemon:x', 'libvirt-lxc:', 'lxc:x'])('rejects %j naming it and the valid forms', (target) => {
    expect(() => parseOutput(target)).toThrow(InputError);
    expect(() => parseOutput(target)).toThrow(`--output ${JSON.stringify(target)}`);
    expect(() => parseOutput(target)).toThrow('docker-archive:FILE, oci:DIR, rootfs:FILE.tar, rootfs:FILE.tar.gz or libvirt-lxc:DIR');
  });
});

describe('applyChanges', () => {
  const base: ContainerConfig = { Env: ['PATH=/usr/bin:/bin', 'HOME=/root'], Cmd: ['/bin/sh'] };

  it('CMD and ENTRYPOINT in JSON and shell form', () => {
    expect(applyChanges(base, ['CMD ["/bin/bash", "-l"]']).Cmd).toEqual(['/bin/bash', '-l']);
    expect(applyChanges(base, ['CMD /bin/bash']).Cmd).toEqual(['/bin/sh', '-c', '/bin/bash']);
    expect(applyChanges(base, ['cmd echo "$HOME" && ls']).Cmd).toEqual(['/bin/sh', '-c', 'echo "$HOME" && ls']);
    // Not valid JSON: the shell form, as Docker does.
    expect(applyChanges(base, ["CMD ['/bin/bash']"]).Cmd).toEqual(['/bin/sh', '-c', "['/bin/bash']"]);
    expect(applyChanges(base, ['CMD []']).Cmd).toEqual([]);
    const e = applyChanges(base, ['ENTRYPOINT ["/init"]']);
    expect(e.Entrypoint).toEqual(['/init']);
    expect(e.Cmd).toBeUndefined();
    expect(applyChanges(base, ['CMD ["x"]', 'ENTRYPOINT /init']) ).toMatchObject({ Cmd: ['x'], Entrypoint: ['/bin/sh', '-c', '/init'] });
  });

  it('ENV in both forms, with substitution from the earlier Env', () => {
    expect(applyChanges(base, ['ENV A=1 B=2']).Env).toEqual(['PATH=/usr/bin:/bin', 'HOME=/root', 'A=1', 'B=2']);
    expect(applyChanges(base, ['ENV A 1 two  three']).Env).toContain('A=1 two  three');
    expect(applyChanges(base, ['ENV PATH=/opt/bin:$PATH']).Env).toEqual(['PATH=/opt/bin:/usr/bin:/bin', 'HOME=/root']);
    expect(applyChanges(base, ['ENV X="a b" Y=\'$HOME\' Z=${HOME}/x W=${NOPE:-dflt} V=${HOME:+set} U=a\\ b']).Env!.slice(2)).toEqual([
      'X=a b', 'Y=$HOME', 'Z=/root/x', 'W=dflt', 'V=set', 'U=a b',
    ]);
    // Within one ENV, values see the Env from before it.
    expect(applyChanges({}, ['ENV A=1', 'ENV A=2 B=$A']).Env).toEqual(['A=2', 'B=1']);
  });

  it('LABEL, EXPOSE, USER, VOLUME, WORKDIR', () => {
    const c = applyChanges(base, [
      'LABEL a=b "c d"="e f" version=$HOME',
      'LABEL single value with spaces',
      'EXPOSE 80 443/tcp 53/UDP 8000-8002',
      'USER builder:wheel',
      'VOLUME ["/data", "/cache"]',
      'VOLUME /var/log /srv',
      'WORKDIR /build',
      'WORKDIR src',
    ]);
    expect(c.Labels).toEqual({ a: 'b', 'c d': 'e f', version: '/root', single: 'value with spaces' });
    expect(Object.keys(c.ExposedPorts!).sort()).toEqual(['443/tcp', '53/udp', '80/tcp', '8000/tcp', '8001/tcp', '8002/tcp']);
    expect(c.User).toBe('builder:wheel');
    expect(Object.keys(c.Volumes!).sort()).toEqual(['/cache', '/data', '/srv', '/var/log']);
    expect(c.WorkingDir).toBe('/build/src');
  });

  it('leaves its input alone', () => {
    const before = structuredClone(base);
    applyChanges(base, ['ENV A=1', 'CMD x', 'LABEL a=b']);
    expect(base).toEqual(before);
  });

  it.each([
    ['RUN make', /unknown or unsupported instruction RUN; expected one of CMD, ENTRYPOINT/],
    ['ONBUILD RUN make', /ONBUILD is not supported/],
    ['HEALTHCHECK NONE', /unsupported instruction HEALTHCHECK/],
    ['', /empty instruction/],
    ['CMD', /CMD needs an argument/],
    ['ENV A', /ENV needs a name and a value/],
    ['ENV A=1 B', /no "=" in "B"/],
    ['LABEL "a=b', /unmatched "/],
    ['EXPOSE 70000', /invalid port "70000"/],
    ['EXPOSE 80/icmp', /invalid port/],
    ['ENV A=${B:?x}', /unsupported substitution/],
  ])('rejects %j', (change, message) => {
    expect(() => applyChanges(base, [change])).toThrow(InputError);
    expect(() => applyChanges(base, [change])).toThrow(message);
    expect(() => applyChanges(base, [change])).toThrow(`--change ${JSON.stringify(change)}`);
  });
});

describe('image config', () => {
  const diffId = `sha256:${'ab'.repeat(32)}`;

  it('is reproducible: fixed time, sorted keys', () => {
    const prev = process.env.SOURCE_DATE_EPOCH;
    delete process.env.SOURCE_DATE_EPOCH;
    try {
      const a = canonicalJson(imageConfig({ architecture: 'amd64', os: 'linux', diffId, config: { Labels: { z: '1', a: '2' }, Cmd: ['x'] } }));
      const b = canonicalJson(imageConfig({ architecture: 'amd64', os: 'linux', diffId, config: { Cmd: ['x'], Labels: { a: '2', z: '1' } } }));
      expect(a.equals(b)).toBe(true);
      expect(a.toString()).toBe(
        '{"architecture":"amd64","config":{"Cmd":["x"],"Labels":{"a":"2","z":"1"}},"created":"1970-01-01T00:00:00Z",' +
          '"history":[{"comment":"root file system of a XenServer DDK","created":"1970-01-01T00:00:00Z","created_by":"ddk2docker"}],' +
          `"os":"linux","rootfs":{"diff_ids":["${diffId}"],"type":"layers"}}`,
      );
    } finally {
      if (prev !== undefined) process.env.SOURCE_DATE_EPOCH = prev;
    }
  });

  it('takes SOURCE_DATE_EPOCH or an explicit time', () => {
    expect(defaultCreated({ SOURCE_DATE_EPOCH: '1700000000' })).toBe('2023-11-14T22:13:20Z');
    expect(() => defaultCreated({ SOURCE_DATE_EPOCH: 'yesterday' })).toThrow(/SOURCE_DATE_EPOCH/);
    expect(imageConfig({ created: '2024-01-02T03:04:05Z', architecture: '386', os: 'linux', diffId, config: {} }).created).toBe('2024-01-02T03:04:05Z');
    expect(() => imageConfig({ created: 'Tuesday', architecture: '386', os: 'linux', diffId, config: {} })).toThrow(/RFC 3339/);
  });

  it('parses tags', () => {
    expect(parseTag('ddk:8.2')).toEqual({ repository: 'ddk', tag: '8.2', fullName: 'docker.io/library/ddk:8.2' });
    expect(parseTag('xenserver/ddk')).toEqual({ repository: 'xenserver/ddk', tag: 'latest', fullName: 'docker.io/xenserver/ddk:latest' });
    expect(parseTag('localhost:5000/ddk:7.1')).toEqual({ repository: 'localhost:5000/ddk', tag: '7.1', fullName: 'localhost:5000/ddk:7.1' });
    expect(parseTag('registry.example.com/x/ddk:1')).toMatchObject({ fullName: 'registry.example.com/x/ddk:1' });
    for (const bad of ['DDK:1', 'ddk:', 'ddk@sha256:00', 'ddk:-x', '/ddk']) expect(() => parseTag(bad)).toThrow(InputError);
  });
});

describe('tar header for the layer', () => {
  it('encodes sizes beyond 8 GiB in base-256', async () => {
    const size = 10 * 1024 ** 3 + 7;
    let seen: number | undefined;
    const stop = new Error('seen');
    const header = tarHeader('blobs/sha256/x', 'file', size, 0);
    await expect(readTar(Readable.from([header]), 'header', async (h) => {
      seen = h.size;
      throw stop;
    })).rejects.toBe(stop);
    expect(seen).toBe(size);
    const { stdout } = await execa('tar', ['-tvf', '-'], { input: Buffer.concat([header, Buffer.alloc(512)]), reject: false });
    expect(stdout).toContain(String(size));
  });
});

describe('docker-archive', () => {
  it('writes what docker load reads, and an OCI layout too', async () => {
    const dir = await scratch('archive');
    const file = join(dir, 'ddk.tar');
    let progress = 0;
    const res = await writeOutput(parseOutput(`docker-archive:${file}`), layer(), meta, { onProgress: (b) => (progress = b) });
    expect(res).toMatchObject({ path: file, diffId: layerDigest, layerBytes: layerSize, layerDigest, storedBytes: layerSize });
    expect(progress).toBe(layerSize);
    expect(await readdir(dir)).toEqual(['ddk.tar']);

    const hex = (d: string) => d.slice('sha256:'.length);
    const { stdout: listing } = await execa('tar', ['-tvf', file]);
    const lines = listing.split('\n');
    expect(lines.map((l) => l.split(/\s+/).pop())).toEqual([
      'blobs/', 'blobs/sha256/', `blobs/sha256/${hex(layerDigest)}`, `blobs/sha256/${hex(res.configDigest)}`,
      `blobs/sha256/${hex(res.manifestDigest!)}`, 'index.json', 'manifest.json', 'oci-layout',
    ]);
    expect(lines[2]).toContain(` ${layerSize} `);

    const extract = async (name: string) => Buffer.from((await execa('tar', ['-xOf', file, name], { encoding: 'buffer' })).stdout);
    const manifest = JSON.parse((await extract('manifest.json')).toString());
    expect(manifest).toEqual([{ Config: `blobs/sha256/${hex(res.configDigest)}`, RepoTags: ['ddk:8.2'], Layers: [`blobs/sha256/${hex(layerDigest)}`] }]);
    const configBytes = await extract(manifest[0].Config);
    expect(sha256(configBytes)).toBe(res.configDigest);
    const config = JSON.parse(configBytes.toString());
    expect(config).toMatchObject({ architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: [layerDigest] }, config: meta.config });
    expect(sha256(await extract(manifest[0].Layers[0]))).toBe(layerDigest);

    // Other readers of the format: skopeo as docker-archive and as oci-archive.
    const { stdout: viaDocker } = await execa('skopeo', ['inspect', '--config', `docker-archive:${file}`]);
    expect(JSON.parse(viaDocker).rootfs.diff_ids).toEqual([layerDigest]);
    const { stdout: viaOci } = await execa('skopeo', ['inspect', '--raw', `oci-archive:${file}:8.2`]);
    expect(sha256(Buffer.from(viaOci))).toBe(res.manifestDigest);
  });

  it('gives the same digests for the same input', async () => {
    const dir = await scratch('archive-twice');
    const a = await writeOutput(parseOutput(`docker-archive:${join(dir, 'a.tar')}`), layer(), meta);
    const b = await writeOutput(parseOutput(`docker-archive:${join(dir, 'b.tar')}`), layer(), meta);
    expect(b.configDigest).toBe(a.configDigest);
    expect(b.manifestDigest).toBe(a.manifestDigest);
    expect((await readFile(a.path)).equals(await readFile(b.path))).toBe(true);
  });
});

async function checkRootfs(rootfs: string): Promise<void> {
  expect(await readFile(join(rootfs, 'etc/hello'), 'utf8')).toBe('hello world\n');
  expect(await readlink(join(rootfs, 'etc/link'))).toBe('hello');
  expect((await lstat(join(rootfs, 'etc/hello.hard'))).ino).toBe((await lstat(join(rootfs, 'etc/hello'))).ino);
  expect((await stat(join(rootfs, 'usr/bin/tool'))).mode & 0o777).toBe(0o755);
  expect(sha256(await readFile(join(rootfs, 'data/random.bin')))).toBe(sha256(random));
}

describe('oci', () => {
  it.each([false, true])('writes an OCI image layout (gzip %s) that skopeo and umoci read', async (gzip) => {
    const dir = await scratch(`oci-${gzip}`);
    const layout = join(dir, 'layout');
    const output: Output = { kind: 'oci', path: layout, gzip };
    const res = await writeOutput(output, layer(), meta, { gzipLevel: 1 });
    expect(res).toMatchObject({ path: layout, diffId: layerDigest, layerBytes: layerSize });
    expect(await readdir(dir)).toEqual(['layout']);
    expect((await readdir(layout)).sort()).toEqual(['blobs', 'index.json', 'oci-layout']);
    expect(JSON.parse(await readFile(join(layout, 'oci-layout'), 'utf8'))).toEqual({ imageLayoutVersion: '1.0.0' });
    const index = JSON.parse(await readFile(join(layout, 'index.json'), 'utf8'));
    expect(index.manifests[0].annotations['org.opencontainers.image.ref.name']).toBe('8.2');

    const blob = await readFile(join(layout, 'blobs/sha256', res.layerDigest.slice(7)));
    expect(sha256(blob)).toBe(res.layerDigest);
    expect(blob.length).toBe(res.storedBytes);
    if (gzip) {
      expect(res.layerDigest).not.toBe(layerDigest);
      expect(sha256(gunzipSync(blob))).toBe(layerDigest);
    } else expect(res.layerDigest).toBe(layerDigest);
    expect((await readdir(join(layout, 'blobs/sha256'))).sort()).toEqual([res.layerDigest, res.configDigest, res.manifestDigest!].map((d) => d.slice(7)).sort());

    const { stdout: raw } = await execa('skopeo', ['inspect', '--raw', `oci:${layout}:8.2`]);
    expect(sha256(Buffer.from(raw))).toBe(res.manifestDigest);
    const manifest = JSON.parse(raw);
    expect(manifest.layers).toEqual([{
      mediaType: gzip ? 'application/vnd.oci.image.layer.v1.tar+gzip' : 'application/vnd.oci.image.layer.v1.tar',
      digest: res.layerDigest, size: res.storedBytes,
    }]);
    const { stdout: config } = await execa('skopeo', ['inspect', '--config', `oci:${layout}:8.2`]);
    expect(JSON.parse(config)).toMatchObject({ rootfs: { diff_ids: [layerDigest] }, config: meta.config });

    const bundle = join(dir, 'bundle');
    await execa('umoci', ['unpack', '--rootless', '--image', `${layout}:8.2`, bundle]);
    await checkRootfs(join(bundle, 'rootfs'));
  });

  it('replaces an existing layout only on success, and never an unrelated directory', async () => {
    const dir = await scratch('oci-replace');
    const layout = join(dir, 'layout');
    await writeOutput({ kind: 'oci', path: layout, gzip: false }, layer(), { ...meta, config: { Cmd: ['old'] }, tag: 'ddk:old' });
    const second = await writeOutput({ kind: 'oci', path: layout, gzip: false }, layer(), meta);
    const index = await readFile(join(layout, 'index.json'), 'utf8');
    expect(index).toContain('"8.2"');
    expect(index).not.toContain('"old"');
    expect((await readdir(join(layout, 'blobs/sha256'))).sort()).toEqual([second.layerDigest, second.configDigest, second.manifestDigest!].map((d) => d.slice(7)).sort());
    expect(await readdir(dir)).toEqual(['layout']);

    const home = join(dir, 'home');
    await mkdir(home);
    await writeFile(join(home, 'precious'), 'x');
    await expect(writeOutput({ kind: 'oci', path: home, gzip: false }, layer(), meta)).rejects.toThrow(/not an OCI image layout; refusing/);
    expect(await readdir(home)).toEqual(['precious']);
  });
});

describe('rootfs', () => {
  it('writes the tar itself', async () => {
    const dir = await scratch('rootfs');
    const file = join(dir, 'ddk.tar');
    await writeFile(file, 'old');
    const res = await writeOutput(parseOutput(`rootfs:${file}`), layer(), meta);
    expect(res).toMatchObject({ path: file, diffId: layerDigest, layerDigest, layerBytes: layerSize, storedBytes: layerSize });
    expect(sha256(await readFile(file))).toBe(layerDigest);
    expect(await readdir(dir)).toEqual(['ddk.tar']);
    // The config digest an image of this layer would have: the OCI output's, uncompressed.
    const oci = await writeOutput({ kind: 'oci', path: join(dir, 'layout'), gzip: false }, layer(), meta);
    expect(res.configDigest).toBe(oci.configDigest);
  });

  it('gzips by suffix', async () => {
    const dir = await scratch('rootfs-gz');
    const file = join(dir, 'ddk.tar.gz');
    const res = await writeOutput(parseOutput(`rootfs:${file}`), layer(), meta, { gzipLevel: 9 });
    const gz = await readFile(file);
    expect(gz.subarray(0, 2)).toEqual(Buffer.from([0x1f, 0x8b]));
    expect(sha256(gunzipSync(gz))).toBe(layerDigest);
    expect(res).toMatchObject({ diffId: layerDigest, layerBytes: layerSize, layerDigest: sha256(gz), storedBytes: gz.length });
    await expect(writeOutput(parseOutput(`rootfs:${file}`), layer(), meta, { gzipLevel: 11 })).rejects.toThrow(/gzip level/);
  });

  it('needs the parent directory to exist', async () => {
    await expect(writeOutput(parseOutput(`rootfs:${join(work, 'nope', 'x.tar')}`), layer(), meta)).rejects.toThrow(/does not exist/);
  });
});

describe('failure leaves nothing behind', () => {
  const outputs = (dir: string): Output[] => [
    { kind: 'docker-archive', path: join(dir, 'ddk.tar') },
    { kind: 'oci', path: join(dir, 'layout'), gzip: false },
    { kind: 'oci', path: join(dir, 'layout'), gzip: true },
    { kind: 'rootfs', path: join(dir, 'ddk.tar') },
    { kind: 'rootfs', path: join(dir, 'ddk.tar.gz'), gzip: true },
  ] as Output[];

  it.each([0, 1, 2, 3, 4])('abort mid-write (output %i), with and without an existing target', async (i) => {
    for (const existing of [false, true]) {
      const dir = await scratch(`abort-${i}-${existing}`);
      const output = outputs(dir)[i]!;
      const target = (output as { path: string }).path;
      if (existing && output.kind === 'oci') {
        await writeOutput(output, layer(), meta);
      } else if (existing) await writeFile(target, 'old');
      const before = (await readdir(dir)).sort();
      const snapshot = existing && output.kind !== 'oci' ? await readFile(target) : undefined;
      const ac = new AbortController();
      const promise = writeOutput(output, layer(), meta, {
        signal: ac.signal,
        onProgress: (b) => {
          if (b > RANDOM_SIZE / 2) ac.abort();
        },
      });
      await expect(promise).rejects.toBeInstanceOf(CancelledError);
      expect((await readdir(dir)).sort()).toEqual(before);
      if (snapshot) expect((await readFile(target)).equals(snapshot)).toBe(true);
      if (existing && output.kind === 'oci') expect(await readdir(join(target, 'blobs/sha256'))).toHaveLength(3);
    }
  });

  it.each([0, 1, 3])('a failing layer stream (output %i)', async (i) => {
    const dir = await scratch(`fail-${i}`);
    const broken = new Readable({
      read() {
        this.destroy(new Error('disk read failed'));
      },
    });
    await expect(writeOutput(outputs(dir)[i]!, broken, meta)).rejects.toThrow('disk read failed');
    expect(await readdir(dir)).toEqual([]);
  });

  it('rejects bad metadata before reading the layer', async () => {
    const dir = await scratch('bad-meta');
    const l = layer();
    await expect(writeOutput({ kind: 'docker-archive', path: join(dir, 'x.tar') }, l, { ...meta, tag: 'Bad Tag' })).rejects.toThrow(InputError);
    expect(l.destroyed).toBe(true);
    await expect(writeOutput({ kind: 'rootfs', path: join(dir, 'x.tar'), gzip: false }, layer(), { ...meta, created: 'now' })).rejects.toThrow(/RFC 3339/);
    expect(await readdir(dir)).toEqual([]);
  });
});
