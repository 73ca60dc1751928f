import { createReadStream } from 'node:fs';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { leftovers, runCli, startCli } from '../helpers/cli.js';
import { startDockerd, type Dockerd } from '../helpers/dockerd.js';
import { buildFixture, type FixtureInfo } from '../helpers/fixtures.js';
import { imageIds } from '../helpers/images.js';

/**
 * `ddk2docker run`: pipeline files converted into a private dockerd, two at once, from a fixture
 * served over http on loopback; sha256s pinned or recorded on first fetch and verified after; a
 * changed source and a failing pipeline fail with the others still done; SIGINT stops them all.
 */
let dockerd: Dockerd;
let fixture: FixtureInfo;
let sha256: string;
let server: Server;
let base: string;
let dir: string;
let env: Record<string, string>;
/** Paths the server now answers with the fixture plus one byte: the "same" URL, other bytes. */
const altered = new Set<string>();
/** Paths the server holds back until released: a download that is still running. */
let hold: Promise<void> | undefined;

interface Outcome {
  name: string;
  status: string;
  seconds: number;
  sha256: { status: string; value?: string };
  error?: string;
  result?: { image: { id: string; tag: string } | null; diffId: string; source: { sha256: string; url?: string } };
}

beforeAll(async () => {
  dockerd = await startDockerd();
  fixture = await buildFixture();
  sha256 = (await execa('sha256sum', [fixture.iso])).stdout.split(' ')[0]!;
  const size = (await stat(fixture.iso)).size;
  dir = await mkdtemp('/tmp/e2e-run-');
  server = createServer((req, res) => {
    void (async () => {
      if (hold) await hold;
      if (!['/a.iso', '/b.iso', '/c.iso', '/d.iso'].includes(req.url ?? '')) {
        res.writeHead(404).end();
        return;
      }
      const extra = altered.has(req.url!) ? 1 : 0;
      res.writeHead(200, { 'content-length': String(size + extra) });
      const body = createReadStream(fixture.iso);
      body.on('end', () => res.end(extra ? Buffer.from('!') : undefined));
      body.pipe(res, { end: false });
    })();
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  env = { DOCKER_HOST: dockerd.host, DDK2DOCKER_DATA_DIR: join(dir, 'data') };
});

afterAll(async () => {
  server?.closeAllConnections();
  await new Promise((r) => server?.close(r));
  await dockerd?.stop();
  await rm(dir, { recursive: true, force: true });
});

async function pipeline(name: string, lines: string[]): Promise<string> {
  const file = join(dir, `${name}.yaml`);
  await writeFile(file, `${lines.join('\n')}\n`);
  return file;
}

async function inspect(ref: string): Promise<{ Id: string; Config: { Labels: Record<string, string>; Cmd: string[] } }> {
  const { stdout } = await execa('docker', ['image', 'inspect', ref], { env: { DOCKER_HOST: dockerd.host } });
  return (JSON.parse(stdout) as { Id: string; Config: { Labels: Record<string, string>; Cmd: string[] } }[])[0]!;
}

function args(files: string[], ...more: string[]): string[] {
  return ['run', ...files, '--workdir', join(dir, 'w'), '--cache-dir', join(dir, 'cache'), ...more];
}

describe('ddk2docker run', () => {
  let a: string;
  let b: string;

  it('runs two pipelines at once: images tagged and labelled, a summary table, a first-fetch sha256 recorded and reported', async () => {
    a = await pipeline('a', [`source: ${base}/a.iso`, `sha256: ${sha256}`, 'tag: run-e2e:a', 'labels:', '  purpose: "e2e a"', 'changes:', `  - 'CMD ["/bin/bash"]'`]);
    b = await pipeline('b', [`name: bee`, `source: ${base}/b.iso`, 'tag: run-e2e:b', 'labels:', '  purpose: "e2e b"', `smoke: test -d /etc && cat /etc/redhat-release`]);
    const r = await runCli(args([a, b], '--concurrency', '2'), env);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/^\[1\/2\] a: started \(.*a\.yaml\)$/m);
    expect(r.stderr).toMatch(/^\[2\/2\] bee: started/m);
    expect(r.stderr).toMatch(/^\[2\/2\] bee: ok in \d+\.\d s$/m);
    // Both started before either finished: they ran at once.
    const lines = r.stderr.split('\n');
    expect(lines.findIndex((l) => /bee: started/.test(l))).toBeLessThan(lines.findIndex((l) => /: ok in/.test(l)));

    const table = r.stdout.split('\n');
    expect(table[0]).toMatch(/^PIPELINE\s+STATUS\s+TAG\/OUTPUT\s+DIFFID\s+SHA256\s+SECONDS$/);
    expect(table[1]).toMatch(/^a\s+ok\s+run-e2e:a\s+[0-9a-f]{12}\s+pinned\s+\d+\.\d$/);
    expect(table[2]).toMatch(/^bee\s+ok\s+run-e2e:b\s+[0-9a-f]{12}\s+recorded\s+\d+\.\d$/);
    expect(r.stdout).toContain('2 of 2 pipelines succeeded');
    expect(r.stdout).toContain(`bee: sha256 recorded on first fetch: ${sha256} (not verified against a published value; add it to ${b} as sha256)`);

    const ia = await inspect('run-e2e:a');
    expect(ia.Config.Labels).toMatchObject({ purpose: 'e2e a', 'ddk2docker.source.sha256': sha256, 'ddk2docker.source.name': 'a.iso' });
    expect(ia.Config.Cmd).toEqual(['/bin/bash']);
    expect((await inspect('run-e2e:b')).Config.Labels).toMatchObject({ purpose: 'e2e b', 'ddk2docker.source.sha256': sha256 });

    const records = JSON.parse(await readFile(join(dir, 'data', 'recorded-sha256.json'), 'utf8')) as { sources: Record<string, { sha256: string; pipeline: string }> };
    expect(Object.keys(records.sources)).toEqual([`${base}/b.iso`]);
    expect(records.sources[`${base}/b.iso`]).toMatchObject({ sha256, pipeline: b });
    expect(await leftovers(join(dir, 'w'))).toEqual([]);
  });

  it('a second run verifies against the recorded sha256; a failing pipeline fails the run (exit 1) while the other succeeds (--json)', async () => {
    const missing = await pipeline('missing', [`source: ${base}/missing.iso`, 'tag: run-e2e:missing']);
    const r = await runCli(args([missing, b], '--concurrency', '2', '--json'), env);
    expect(r.code, r.stderr).toBe(1);
    const out = JSON.parse(r.stdout) as { ok: boolean; pipelines: Outcome[] };
    expect(out.ok).toBe(false);
    expect(out.pipelines.map((p) => [p.name, p.status])).toEqual([
      ['missing', 'failed'],
      ['bee', 'ok'],
    ]);
    expect(out.pipelines[0]).toMatchObject({ sha256: { status: 'unchecked' }, error: `${base}/missing.iso: HTTP 404` });
    expect(out.pipelines[1]).toMatchObject({ sha256: { status: 'verified', value: sha256 } });
    expect(out.pipelines[1]!.result?.image?.tag).toBe('run-e2e:b');
    expect(out.pipelines[1]!.result?.diffId).toMatch(/^sha256:[0-9a-f]{64}$/);
    expect(r.stderr).toMatch(/^\[1\/2\] missing: failed in \d+\.\d s: .*HTTP 404$/m);
    expect(r.stderr).toMatch(/^\[2\/2\] bee: ok in /m);
  });

  it('a source that now serves other bytes fails, naming the URL and the recorded sha256', async () => {
    altered.add('/b.iso');
    try {
      const before = await imageIds(dockerd.host);
      // A fresh cache: the bytes come from the server again, as on another machine.
      const r = await runCli(['run', b, '--workdir', join(dir, 'w'), '--cache-dir', join(dir, 'cache-2')], env);
      expect(r.code).toBe(1);
      expect(r.stdout).toMatch(/^bee\s+failed\s+-\s+-\s+mismatch\s+/m);
      const message = `bee: failed: ${base}/b.iso: sha256 mismatch: expected ${sha256}, got `;
      expect(r.stdout).toContain(message);
      expect(r.stdout).toMatch(new RegExp(`is the sha256 recorded on its first fetch \\(.*, by .*b\\.yaml\\) in .*recorded-sha256\\.json, so the source has changed since`));
      expect(await imageIds(dockerd.host)).toEqual(before);
      expect(await leftovers(join(dir, 'w'))).toEqual([]);
    } finally {
      altered.delete('/b.iso');
    }
  });

  it('SIGINT stops every running pipeline; each cleans up and the summary says so', async () => {
    const before = await imageIds(dockerd.host);
    const c = await pipeline('c', [`source: ${base}/c.iso`, 'tag: run-e2e:c']);
    const d = await pipeline('d', [`source: ${base}/d.iso`, 'tag: run-e2e:d']);
    let release!: () => void;
    hold = new Promise<void>((r) => (release = r));
    let r: Awaited<ReturnType<typeof startCli>>;
    try {
      const child = startCli(args([c, d], '--concurrency', '2', '--cache-dir', join(dir, 'cache-3')), env);
      let stderr = '';
      child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
      // Both downloads are held by the server: both pipelines are running when the signal comes.
      while (!/\[2\/2\] d: started/.test(stderr) && child.exitCode === null) await new Promise((res) => setTimeout(res, 50));
      child.kill('SIGINT');
      r = await child;
    } finally {
      release();
      hold = undefined;
    }
    expect(r.exitCode, String(r.stderr)).toBe(130);
    expect(String(r.stdout)).toMatch(/^c\s+cancelled\s+/m);
    expect(String(r.stdout)).toMatch(/^d\s+cancelled\s+/m);
    expect(String(r.stderr)).toMatch(/SIGINT: stopping and cleaning up/);
    expect(await imageIds(dockerd.host)).toEqual(before);
    expect(await leftovers(join(dir, 'w'))).toEqual([]);
  });
});
