import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { mkdtemp, open, readFile, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import { execa } from 'execa';
import { XMLParser } from 'fast-xml-parser';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { compareManifests, manifestFromTar, type Manifest } from '../../src/manifest.js';
import { startDockerd, type Dockerd } from '../helpers/dockerd.js';
import { buildFixture, rootOracleTar, type FixtureInfo, type FixtureOptions } from '../helpers/fixtures.js';

// The fixtures are checked with tools independent of the script that made them: bsdtar reads the
// ISO, zlib the chunks, qemu-img the VHD, the kernel (loop mount) the file system.
const CHUNK = 1_000_000_000;
const chunkName = (n: number) => `ddk/xvda/chunk-${String(n).padStart(9, '0')}.gz`;

async function isAllZero(file: string, start: number, length: number): Promise<boolean> {
  const fh = await open(file, 'r');
  const buf = Buffer.alloc(16 << 20);
  const zero = Buffer.alloc(buf.length);
  try {
    for (let pos = start; pos < start + length;) {
      const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, start + length - pos), pos);
      if (bytesRead === 0) return true;
      if (!buf.subarray(0, bytesRead).equals(zero.subarray(0, bytesRead))) return false;
      pos += bytesRead;
    }
    return true;
  } finally {
    await fh.close();
  }
}

async function sha256Range(file: string, start: number, length: number): Promise<string> {
  const hash = createHash('sha256');
  await pipeline(createReadStream(file, { start, end: start + length - 1, highWaterMark: 4 << 20 }), hash);
  return hash.digest('hex');
}

/** A chunk from the ISO (bsdtar), decompressed (zlib) into sink. */
async function chunkInto(iso: string, n: number, sink: Writable): Promise<void> {
  const proc = execa('bsdtar', ['-xOf', iso, chunkName(n)], { buffer: false });
  await Promise.all([pipeline(proc.stdout, createGunzip({ chunkSize: 1 << 20 }), sink), proc]);
}

async function oracleManifest(info: FixtureInfo): Promise<Manifest> {
  const tar = await rootOracleTar(info);
  return manifestFromTar(createReadStream(tar), tar);
}

function describeFixture(name: string, opts: FixtureOptions, extra: (get: () => FixtureInfo) => void) {
  describe(name, () => {
    let info: FixtureInfo;
    beforeAll(async () => {
      info = await buildFixture(opts);
    });

    it('lists ova.xml and exactly the present chunks in the ISO (bsdtar)', async () => {
      const { stdout } = await execa('bsdtar', ['-tvf', info.iso]);
      // Regular files only ("-rw-r--r-- …"); the name is the last field (no spaces in these).
      const files = stdout.split('\n').filter((l) => l.startsWith('-')).map((l) => l.split(' ').at(-1)!).sort();
      expect(files).toEqual(['ddk/ova.xml', ...info.chunks.map(chunkName)].sort());
    });

    it('describes the disk in ova.xml', async () => {
      const { stdout } = await execa('bsdtar', ['-xOf', info.iso, 'ddk/ova.xml']);
      const xml = new XMLParser({ ignoreAttributes: false, attributeNamePrefix: '' }).parse(stdout);
      expect(xml.appliance.vm.label).toBe(info.label);
      expect(xml.appliance.vm.vbd).toMatchObject({ device: 'xvda', vdi: 'vdi_xvda' });
      expect(xml.appliance.vdi).toMatchObject({ name: 'vdi_xvda', size: String(info.vdiSize), source: 'file://xvda', type: 'dir-gzipped-chunks' });
      expect(info.vdiSize).toBe(info.diskSize);
    });

    it('leaves out exactly the all-zero chunks of the stream', async () => {
      const all = Array.from({ length: Math.ceil(info.streamSize / CHUNK) }, (_, i) => i);
      expect([...info.chunks, ...info.leftOut].sort((a, b) => a - b)).toEqual(all);
      for (const n of info.leftOut) expect(await isAllZero(info.stream, n * CHUNK, CHUNK), `chunk ${n}`).toBe(true);
    });

    it('holds each present chunk as the gzip of its stream bytes', async () => {
      for (const n of info.chunks) {
        const hash = createHash('sha256');
        const length = Math.min(CHUNK, info.streamSize - n * CHUNK);
        const [, expected] = await Promise.all([chunkInto(info.iso, n, hash), sha256Range(info.stream, n * CHUNK, length)]);
        expect(hash.digest('hex'), `chunk ${n}`).toBe(expected);
      }
    });

    it('partitions the disk as described (sfdisk)', async () => {
      const { stdout } = await execa('sfdisk', ['--json', info.disk]);
      const table = JSON.parse(stdout).partitiontable;
      expect(table.label).toBe('dos');
      expect(table.partitions.map((p: { start: number; size: number; type: string }) => ({ start: p.start, bytes: p.size * 512, type: p.type })))
        .toEqual(info.partitions.map((p) => ({ start: p.startSector, bytes: p.sizeBytes, type: p.type })));
    });

    it('holds the source tree exactly, as the kernel sees it', async () => {
      const oracle = await oracleManifest(info);
      const tmp = await mkdtemp('/tmp/fixtures-test-');
      try {
        const tar = join(tmp, 'rootfs.tar');
        await execa('tar', ['--numeric-owner', '--xattrs', '--xattrs-include=*', '--format=posix', '--sort=name', '-C', join(info.dir, 'rootfs'), '-cf', tar, '.']);
        const tree = await manifestFromTar(createReadStream(tar), tar);
        expect(compareManifests(tree, oracle, { ignore: (p) => p === 'lost+found' })).toEqual([]);
      } finally {
        await rm(tmp, { recursive: true, force: true });
      }
    });

    it('has representative content in the oracle tar', async () => {
      const m = await oracleManifest(info);
      const get = (p: string) => {
        const e = m.get(p);
        if (!e) throw new Error(`${p} missing from the oracle`);
        return e;
      };
      expect(get('usr/bin/suid-root')).toMatchObject({ type: 'file', mode: 0o4755, uid: 0 });
      expect(get('usr/bin/sgid-tty')).toMatchObject({ mode: 0o2755, gid: 5 });
      expect(get('tmp')).toMatchObject({ type: 'directory', mode: 0o1777 });
      expect(get('home/user/secret.txt')).toMatchObject({ mode: 0o640, uid: 1000, gid: 1000 });
      expect(get('var/lib/uid100000')).toMatchObject({ uid: 100000, gid: 100000 });
      expect(get('usr/bin/ping').xattrs['security.capability']).toBeDefined();
      expect(get('usr/share/ddk/xattr-file').xattrs['user.test']).toBe(Buffer.from('hello xattr').toString('hex'));
      expect(get('dev/null')).toMatchObject({ type: 'character-device', devmajor: 1, devminor: 3 });
      expect(get('dev/sda1')).toMatchObject({ type: 'block-device', devmajor: 8, devminor: 1 });
      expect(get('dev/bignum')).toMatchObject({ type: 'character-device', devmajor: 511, devminor: 70000 });
      expect(get('dev/initctl').type).toBe('fifo');
      const group = get('usr/share/ddk/hardlink-a').linkGroup;
      expect(group).toBeDefined();
      for (const p of ['usr/share/ddk/hardlink-b', 'var/lib/hardlink-c']) expect(get(p).linkGroup).toBe(group);
      expect(get('bin/sh')).toMatchObject({ type: 'symlink', linkname: 'busybox' });
      expect(get('usr/share/ddk/slow-link').linkname).toHaveLength(200);
      expect(get('usr/bin/dangling-link').linkname).toBe('/nonexistent/target');
      expect(get(`usr/share/ddk/names/${'n'.repeat(255)}`).type).toBe('file');
      for (const n of ['new\nline', 'Zürich ünïcode', '$(touch pwned)', 'back\\\\slash', 'caf\\xe9-latin1']) expect(get(`usr/share/ddk/names/${n}`).type).toBe('file');
      expect(get('var/lib/sparse.img').size).toBe(50 * 1024 * 1024);
      expect(get('usr/share/ddk/README').mtimeNs).toBe(1416484800_500000000n);
      expect(get('usr/share/many').mtimeNs).toBe(1456790399_999999999n);
      expect(get('usr/share/ddk/future').mtimeNs).toBe(2222121600_250000000n);
      expect(get('usr/share/ddk/past').mtimeNs).toBe(-152391232_110000000n);
      expect([...m.keys()].filter((p) => p.startsWith('usr/share/many/'))).toHaveLength(300);
      expect(get('etc/redhat-release').sha256).toBe(createHash('sha256').update(`${info.redhatRelease}\n`).digest('hex'));
    });

    extra(() => info);
  });
}

describeFixture('default fixture (raw disk, ext4)', {}, (get) => {
  it('leaves out a chunk in the middle of the root file system', () => {
    const info = get();
    const root = info.partitions[0]!;
    const [start, end] = [root.startSector * 512, root.startSector * 512 + root.sizeBytes];
    expect(info.leftOut.some((n) => n * CHUNK > start && (n + 1) * CHUNK < end && info.chunks.includes(n + 1))).toBe(true);
  });
});

describeFixture('VHD (dynamic) fixture with ext3 at sector 63', { payload: 'vhd-dynamic', fs: 'ext3', startSector: 63 }, (get) => {
  let tmp: string;
  beforeAll(async () => {
    tmp = await mkdtemp('/tmp/fixtures-test-');
  });
  afterAll(async () => {
    await rm(tmp, { recursive: true, force: true });
  });

  it('carries a VHD that qemu-img reads back as the raw disk', async () => {
    const info = get();
    const stream = join(tmp, 'stream.vhd');
    await writeFile(stream, '');
    await truncate(stream, info.streamSize);
    for (const n of info.chunks) await chunkInto(info.iso, n, createWriteStream(stream, { flags: 'r+', start: n * CHUNK }));
    const { stdout } = await execa('qemu-img', ['info', '--output=json', stream]);
    expect(JSON.parse(stdout)).toMatchObject({ format: 'vpc', 'virtual-size': info.diskSize });
    await execa('qemu-img', ['compare', '-f', 'vpc', '-F', 'raw', stream, info.disk]);
  });

  it('starts partition 1 at sector 63 and has a zero chunk between root and swap', async () => {
    const info = get();
    const [root, swap] = info.partitions as [FixtureInfo['partitions'][0], FixtureInfo['partitions'][0]];
    expect(root.startSector).toBe(63);
    const gap = Math.ceil((root.startSector * 512 + root.sizeBytes) / CHUNK);
    expect((gap + 1) * CHUNK).toBeLessThanOrEqual(swap.startSector * 512);
    expect(await isAllZero(info.disk, gap * CHUNK, CHUNK)).toBe(true);
  });

  it('has an ext3 root file system', async () => {
    const info = get();
    const { stdout } = await execa('dumpe2fs', ['-h', `${info.disk}?offset=${info.partitions[0]!.startSector * 512}`], { stderr: 'ignore' });
    const features = /^Filesystem features:\s+(.*)$/m.exec(stdout)![1]!.split(' ');
    expect(features).toContain('has_journal');
    expect(features).not.toContain('extent');
    expect(await readFile(join(info.dir, 'rootfs/etc/redhat-release'), 'utf8')).toBe(`${info.redhatRelease}\n`);
  });
});

describe('private dockerd', () => {
  let dockerd: Dockerd;
  beforeAll(async () => {
    dockerd = await startDockerd();
  });
  afterAll(async () => {
    await dockerd?.stop();
  });

  it('imports the oracle tar and runs the fixture\'s busybox in it', async () => {
    const info = await buildFixture();
    const env = { DOCKER_HOST: dockerd.host };
    expect(dockerd.host).toBe(`unix://${dockerd.dir}/docker.sock`);
    await execa('docker', ['import', await rootOracleTar(info), 'ddk-fixture:test'], { env });
    const { stdout } = await execa('docker', ['run', '--rm', 'ddk-fixture:test', '/bin/cat', '/etc/redhat-release'], { env });
    expect(stdout).toBe(info.redhatRelease);
  });

  it('stops and removes its directory', async () => {
    await dockerd.stop();
    await expect(stat(dockerd.dir)).rejects.toThrow();
    await dockerd.stop();
  });
});
