import { createReadStream, createWriteStream } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { execa } from 'execa';
import tar from 'tar-stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { applyChanges } from '../../src/docker/image.js';
import { writeOutput, type ImageMeta } from '../../src/docker/outputs.js';
import { startDockerd, type Dockerd } from '../helpers/dockerd.js';

/** The images a real dockerd makes of our file outputs: docker load, and skopeo for OCI layouts. */

let dockerd: Dockerd;
let work: string;
let layerPath: string;
const HELLO = 'hello from a ddk2docker layer\n';

const docker = (args: string[]) => execa('docker', args, { env: { DOCKER_HOST: dockerd.host } });

beforeAll(async () => {
  dockerd = await startDockerd();
  work = await mkdtemp(join(tmpdir(), 'ddk2docker-load-'));
  layerPath = join(work, 'layer.tar');
  const busybox = await readFile('/bin/busybox');
  const pack = tar.pack();
  for (const dir of ['bin', 'etc', 'tmp']) pack.entry({ name: dir, type: 'directory', mode: dir === 'tmp' ? 0o1777 : 0o755 });
  pack.entry({ name: 'bin/busybox', mode: 0o755 }, busybox);
  pack.entry({ name: 'bin/sh', type: 'symlink', linkname: 'busybox' });
  // Docker applies a hard link's header mode to the shared inode: it must be the file's.
  pack.entry({ name: 'bin/cat', type: 'link', linkname: 'bin/busybox', mode: 0o755 });
  pack.entry({ name: 'etc/hello', mode: 0o644 }, HELLO);
  pack.finalize();
  await pipeline(pack, createWriteStream(layerPath));
});

afterAll(async () => {
  await dockerd?.stop();
  if (work) await rm(work, { recursive: true, force: true });
});

const meta = (tag: string): ImageMeta => ({
  architecture: 'amd64',
  tag,
  config: applyChanges({}, ['ENV PATH=/bin', 'CMD ["/bin/cat", "/etc/hello"]', 'LABEL org.example.source="ddk2docker e2e"', 'WORKDIR /tmp']),
});

async function inspect(ref: string) {
  const { stdout } = await docker(['image', 'inspect', ref]);
  return JSON.parse(stdout)[0];
}

describe('docker load of a docker-archive', () => {
  it('loads with the tag, config and layer we wrote, and runs', async () => {
    const file = join(work, 'ddk.tar');
    const res = await writeOutput({ kind: 'docker-archive', path: file }, createReadStream(layerPath), meta('ddk-e2e:1'));
    const { stdout: loaded } = await docker(['load', '-i', file]);
    expect(loaded).toContain('ddk-e2e:1');

    const image = await inspect('ddk-e2e:1');
    expect(image.RepoTags).toEqual(['ddk-e2e:1']);
    // The classic image store names an image by its config digest.
    expect(image.Id).toBe(res.configDigest);
    expect(image.RootFS.Layers).toEqual([res.diffId]);
    expect(image.Config.Cmd).toEqual(['/bin/cat', '/etc/hello']);
    expect(image.Config.Labels).toEqual({ 'org.example.source': 'ddk2docker e2e' });
    expect(image.Config.Env).toEqual(['PATH=/bin']);
    expect(image.Config.WorkingDir).toBe('/tmp');
    expect(image.Architecture).toBe('amd64');

    const { stdout } = await docker(['run', '--rm', '--network', 'none', 'ddk-e2e:1', '/bin/busybox', 'cat', '/etc/hello']);
    expect(`${stdout}\n`).toBe(HELLO);
    const { stdout: byDefault } = await docker(['run', '--rm', '--network', 'none', 'ddk-e2e:1']);
    expect(`${byDefault}\n`).toBe(HELLO);
    const { stdout: pwd } = await docker(['run', '--rm', '--network', 'none', 'ddk-e2e:1', 'sh', '-c', 'pwd; readlink /bin/sh']);
    expect(pwd).toBe('/tmp\nbusybox');
  });

  it('loads an untagged archive by its id', async () => {
    const file = join(work, 'untagged.tar');
    const res = await writeOutput({ kind: 'docker-archive', path: file }, createReadStream(layerPath), { ...meta('x'), tag: undefined, config: { Cmd: ['/bin/busybox', 'true'] } });
    const { stdout } = await docker(['load', '-i', file]);
    expect(stdout).toContain(res.configDigest);
    const { exitCode } = await docker(['run', '--rm', '--network', 'none', res.configDigest]);
    expect(exitCode).toBe(0);
  });
});

describe('skopeo copy of an OCI layout into the daemon', () => {
  it.each([false, true])('gzip %s', async (gzip) => {
    const dir = join(work, `layout-${gzip}`);
    const res = await writeOutput({ kind: 'oci', path: dir, gzip }, createReadStream(layerPath), meta(`ddk-oci:${gzip ? 'gz' : 'plain'}`));
    const ref = `ddk-oci:${gzip ? 'gz' : 'plain'}`;
    await execa('skopeo', ['copy', '--dest-daemon-host', dockerd.host, `oci:${dir}:${gzip ? 'gz' : 'plain'}`, `docker-daemon:${ref}`]);
    const image = await inspect(ref);
    expect(image.RootFS.Layers).toEqual([res.diffId]);
    expect(image.Config.Cmd).toEqual(['/bin/cat', '/etc/hello']);
    const { stdout } = await docker(['run', '--rm', '--network', 'none', ref]);
    expect(`${stdout}\n`).toBe(HELLO);
  });
});
