import { mkdtemp, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import got from 'got';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { leftovers, runCli } from '../helpers/cli.js';
import { startDockerd, type Dockerd } from '../helpers/dockerd.js';
import { buildFixture, type FixtureInfo } from '../helpers/fixtures.js';
import { imageIds } from '../helpers/images.js';
import { freePort, startRegistry, startTokenServer, type Registry, type TokenServer } from '../helpers/registry.js';

/**
 * --push to Debian's docker-registry on loopback: the pushed image is what skopeo and a real
 * dockerd see (gzip layer whose diffID is the conversion's), the tag appears only for a run that
 * succeeded, and each auth flow (anonymous, Basic over TLS, Bearer token) works or fails with one line.
 */
let dockerd: Dockerd;
let fixture: FixtureInfo;
let work: string;
let out: string;
let anonymous: Registry;
/** The manifest digest of the first push: every output of the same source pushes the same image. */
let firstDigest: string;
const USER = { user: 'ddk', password: 'pässword:with colon' };

interface JsonResult {
  diffId: string;
  path?: string;
  image: { id: string; tag: string | null } | null;
  pushed?: { ref: string; digest: string };
  stages: { name: string }[];
}

interface OciManifest {
  mediaType: string;
  config: { digest: string };
  layers: { mediaType: string; digest: string }[];
}

beforeAll(async () => {
  [dockerd, fixture, anonymous] = await Promise.all([startDockerd(), buildFixture(), startRegistry()]);
  work = await mkdtemp('/tmp/e2e-push-work-');
  out = await mkdtemp('/tmp/e2e-push-out-');
});

afterAll(async () => {
  await Promise.all([dockerd?.stop(), anonymous?.stop()]);
  await rm(work, { recursive: true, force: true });
  await rm(out, { recursive: true, force: true });
});

const docker = (args: string[]) => execa('docker', args, { env: { DOCKER_HOST: dockerd.host } });
const convert = (args: string[], env: Record<string, string> = {}) =>
  runCli(['convert', fixture.iso, '--workdir', work, '--quiet', '--json', ...args], { DOCKER_HOST: dockerd.host, ...env });

async function skopeoInspect(ref: string, extra: string[] = []): Promise<{ manifest: OciManifest; config: { rootfs: { diff_ids: string[] } }; digest: string }> {
  const run = async (flags: string[]) => String((await execa('skopeo', ['inspect', '--tls-verify=false', ...extra, ...flags, `docker://${ref}`])).stdout);
  const [raw, config, info] = await Promise.all([run(['--raw']), run(['--config']), run([])]);
  return { manifest: JSON.parse(raw) as OciManifest, config: JSON.parse(config) as { rootfs: { diff_ids: string[] } }, digest: (JSON.parse(info) as { Digest: string }).Digest };
}

async function tags(registry: string, name: string): Promise<{ status: number; tags: string[] }> {
  const res = await got(`http://${registry}/v2/${name}/tags/list`, { throwHttpErrors: false, retry: { limit: 0 } });
  return { status: res.statusCode, tags: res.statusCode === 200 ? ((JSON.parse(res.body) as { tags: string[] | null }).tags ?? []) : [] };
}

function oneLine(stderr: string): string {
  const lines = stderr.split('\n').filter(Boolean);
  expect(lines, stderr).toHaveLength(1);
  return lines[0]!;
}

describe('anonymous registry (plain HTTP on loopback)', () => {
  let layerDigest: string;

  it('docker-archive output + push: skopeo and docker pull see the same image, diffID and all', async () => {
    const ref = `${anonymous.host}/ddk/test:1`;
    const archive = join(out, 'x.tar');
    const r = await convert(['--output', `docker-archive:${archive}`, '--push', ref]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const result = JSON.parse(r.stdout) as JsonResult;
    expect(result.pushed?.ref).toBe(ref);
    expect(result.stages.map((s) => s.name).slice(-3)).toEqual(['upload', 'verify', 'push']);

    const seen = await skopeoInspect(ref);
    expect(seen.digest).toBe(result.pushed!.digest);
    expect(seen.manifest.mediaType).toBe('application/vnd.oci.image.manifest.v1+json');
    expect(seen.manifest.layers.map((l) => l.mediaType)).toEqual(['application/vnd.oci.image.layer.v1.tar+gzip']);
    expect(seen.config.rootfs.diff_ids).toEqual([result.diffId]);
    layerDigest = seen.manifest.layers[0]!.digest;
    firstDigest = seen.digest;
    // The same image as the archive: its config blob is the archive's.
    const { stdout: listing } = await execa('tar', ['-tf', archive]);
    expect(listing.split('\n')).toContain(`blobs/sha256/${seen.manifest.config.digest.slice(7)}`);

    // dockerd treats 127.0.0.0/8 as an insecure registry: plain HTTP, as we pushed.
    await docker(['pull', ref]);
    const image = JSON.parse((await docker(['image', 'inspect', ref])).stdout)[0];
    expect(image.RootFS.Layers).toEqual([result.diffId]);
    expect(image.Id).toBe(seen.manifest.config.digest);
    const { stdout } = await docker(['run', '--rm', '--network', 'none', ref, 'cat', '/etc/redhat-release']);
    expect(stdout).toContain(fixture.redhatRelease);
    expect(await leftovers(work)).toEqual([]);
  });

  it('verify fails after the layer was uploaded: no tag in the registry, no image in the daemon', async () => {
    const before = await imageIds(dockerd.host);
    const r = await convert(['--output', 'docker', '--smoke', 'exit 3', '--push', `${anonymous.host}/ddk/fail:1`]);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/^ddk2docker: smoke command "exit 3" failed/);
    // The layer did go up (the same bytes as before, so the same gzip digest): harmless, unnamed.
    const blob = await got.head(`http://${anonymous.host}/v2/ddk/fail/blobs/${layerDigest}`, { throwHttpErrors: false });
    expect(blob.statusCode).toBe(200);
    expect((await tags(anonymous.host, 'ddk/fail')).tags).toEqual([]);
    expect(await imageIds(dockerd.host)).toEqual(before);
    expect(await leftovers(work)).toEqual([]);
  });

  it('the output fails while the layer streams (no daemon): one line, nothing tagged', async () => {
    const r = await convert(['--output', 'docker', '--push', `${anonymous.host}/ddk/nodaemon:1`], { DOCKER_HOST: 'unix:///nonexistent/docker.sock' });
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/^ddk2docker: no Docker daemon answers at unix:\/\/\/nonexistent\/docker\.sock/);
    expect((await tags(anonymous.host, 'ddk/nodaemon')).tags).toEqual([]);
    expect(await leftovers(work)).toEqual([]);
  });

  it('a bad --sha256: nothing pushed', async () => {
    const r = await convert(['--output', `rootfs:${join(out, 'bad.tar')}`, '--sha256', '0'.repeat(64), '--push', `${anonymous.host}/ddk/badsha:1`]);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/ddk\.iso: sha256 mismatch/);
    expect(await tags(anonymous.host, 'ddk/badsha')).toEqual({ status: 404, tags: [] });
    expect(await leftovers(work)).toEqual([]);
  });

  it('registry down: one line naming it, exit 1, nothing written', async () => {
    const port = await freePort();
    const target = join(out, 'down.tar');
    const r = await convert(['--output', `docker-archive:${target}`, '--push', `127.0.0.1:${port}/ddk/test:1`]);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(new RegExp(`^ddk2docker: registry 127\\.0\\.0\\.1:${port}: cannot connect to https://127\\.0\\.0\\.1:${port}: connect ECONNREFUSED`));
    expect(r.stdout).toBe('');
    await expect(stat(target)).rejects.toThrow(/ENOENT/);
    expect(await leftovers(work)).toEqual([]);
  });
});

describe('Basic auth (htpasswd, TLS)', () => {
  let registry: Registry;
  beforeAll(async () => {
    registry = await startRegistry({ htpasswd: USER, tls: true });
  });
  afterAll(() => registry?.stop());

  it('pushes with REGISTRY_USER / REGISTRY_PASSWORD (oci output)', async () => {
    const ref = `${registry.host}/ddk/basic:1`;
    const r = await convert(['--output', `oci:${join(out, 'layout')}`, '--push', ref], { REGISTRY_USER: USER.user, REGISTRY_PASSWORD: USER.password });
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const result = JSON.parse(r.stdout) as JsonResult;
    const seen = await skopeoInspect(ref, ['--creds', `${USER.user}:${USER.password}`]);
    expect(seen.digest).toBe(result.pushed!.digest);
    expect(seen.digest).toBe(firstDigest);
    expect(seen.config.rootfs.diff_ids).toEqual([result.diffId]);
    // It speaks only TLS (Go answers plain HTTP with 400), so the push went over HTTPS.
    expect((await got(`http://${registry.host}/v2/`, { throwHttpErrors: false, retry: { limit: 0 } })).statusCode).toBe(400);
  });

  it.each([
    ['no credentials', {}, /asks for credentials \(Basic\): set REGISTRY_USER and REGISTRY_PASSWORD/],
    ['a wrong password', { REGISTRY_USER: USER.user, REGISTRY_PASSWORD: 'wrong' }, /rejected the credentials of user ddk$/],
    ['a user without password', { REGISTRY_USER: USER.user }, /^ddk2docker: REGISTRY_PASSWORD: set both/],
  ])('%s: one line, exit 1, nothing left', async (_name, env, message) => {
    const r = await convert(['--output', `rootfs:${join(out, 'basic.tar')}`, '--push', `${registry.host}/ddk/basic:2`], env);
    expect(r.code).toBe(1);
    const line = oneLine(r.stderr);
    expect(line).toMatch(message);
    expect(line).not.toContain('wrong');
    expect(await leftovers(work)).toEqual([]);
  });
});

describe('Bearer token auth', () => {
  let token: TokenServer;
  let registry: Registry;
  beforeAll(async () => {
    token = await startTokenServer(USER, { expireFirst: true });
    registry = await startRegistry({ token });
  });
  afterAll(async () => {
    await registry?.stop();
    await token?.stop();
  });

  it('gets a push token from the challenge realm, again when it expired, and pushes (docker output, verified first)', async () => {
    const ref = `${registry.host}/ddk/bearer:1`;
    const r = await convert(['--output', 'docker', '--tag', 'ddk-push:bearer', '--push', ref], { REGISTRY_USER: USER.user, REGISTRY_PASSWORD: USER.password });
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const result = JSON.parse(r.stdout) as JsonResult;
    // The first token came back expired: one more was fetched, the same way.
    expect(token.requests.slice(0, 2)).toEqual([{ scope: 'repository:ddk/bearer:pull,push', user: USER.user }, { scope: 'repository:ddk/bearer:pull,push', user: USER.user }]);
    const seen = await skopeoInspect(ref, ['--creds', `${USER.user}:${USER.password}`]);
    expect(seen.digest).toBe(result.pushed!.digest);
    expect(seen.digest).toBe(firstDigest);
    expect(seen.config.rootfs.diff_ids).toEqual([result.diffId]);
  });

  it('a wrong password: the token service refuses, one line', async () => {
    const r = await convert(['--output', 'docker', '--push', `${registry.host}/ddk/bearer:2`], { REGISTRY_USER: USER.user, REGISTRY_PASSWORD: 'wrong' });
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/^ddk2docker: registry 127\.0\.0\.1:\d+: token service http:\/\/127\.0\.0\.1:\d+ rejected the credentials of user ddk$/);
  });
});
