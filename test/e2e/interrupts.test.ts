import { createReadStream } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, stat } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { leftovers, runCli, startCli } from '../helpers/cli.js';
import { startDockerd, type Dockerd } from '../helpers/dockerd.js';
import { buildMiniDdk, type MiniDdk } from '../helpers/faults.js';
import { buildFixture, type FixtureInfo } from '../helpers/fixtures.js';
import { imageIds } from '../helpers/images.js';

/**
 * Interruptions, both engines: SIGINT and SIGTERM in every stage, the daemon stopped while an
 * image streams into it, a full file system under the scratch space and under each file output.
 * After each: the exit status says so, nothing is left (no mount, no loop device, no scratch
 * file), no image was added, the tag still names the image it named before, no output file or
 * directory exists; and a rerun succeeds.
 *
 * Most stages take milliseconds on a small disk, too fast to hit with a signal at will. The
 * runner's test hook DDK2DOCKER_TEST_HOLD=<stage> keeps that stage open, its work done and what
 * it made (mounts, loop devices, scratch files, the imported image, the tag) in place, until the
 * run is aborted; the signal is sent when the stage says it is held. The slow stages of the large
 * fixture (a download throttled by the test's server, decompress, import, verify) are also
 * interrupted for real, mid-work, when they start.
 */
const DOCKERD = fileURLToPath(new URL('../../scripts/dockerd', import.meta.url));
const STAGES = ['fetch', 'extract', 'decompress', 'convert', 'map', 'export', 'import', 'verify'] as const;
const SIGNALS = ['SIGINT', 'SIGTERM'] as const;
const EXIT: Partial<Record<NodeJS.Signals, number>> = { SIGINT: 130, SIGTERM: 143 };
const TAG = 'ddk-int:1';

let dockerd: Dockerd;
let mini: MiniDdk;
let big: FixtureInfo;
let dir: string;
let work: string;
/** The image TAG names before any run: every interrupted run must leave it there. */
let previous: string;
let baseline: string[];

const env = () => ({ DOCKER_HOST: dockerd.host });

async function tagTarget(): Promise<string | undefined> {
  const r = await execa('docker', ['image', 'inspect', '--format', '{{.Id}}', TAG], { env: env(), reject: false });
  return r.exitCode === 0 ? String(r.stdout).trim() : undefined;
}

/** A rerun tagged a new image: give the tag back to `previous` and remove it, so the next case starts where this one did. */
async function restoreTag(): Promise<void> {
  const id = await tagTarget();
  expect(id).not.toBe(previous);
  await execa('docker', ['tag', previous, TAG], { env: env() });
  await execa('docker', ['rmi', id!], { env: env() });
}

interface Interrupted {
  code: number;
  log: string;
  /** What the run had made under the workdir parent when the signal was sent. */
  during: string[];
}

/**
 * Runs the CLI and, when its stderr first matches `trigger`, calls `act` (by default: send
 * `signal`). Resolves with the exit status and the whole stderr.
 */
async function interrupt(args: string[], trigger: RegExp, signal: NodeJS.Signals, extraEnv: Record<string, string> = {}, act?: (child: ReturnType<typeof startCli>) => Promise<void>): Promise<Interrupted> {
  const child = startCli(args, { ...env(), ...extraEnv });
  let log = '';
  let fired: Promise<string[]> | undefined;
  child.stderr!.on('data', (b: Buffer) => {
    log += b.toString();
    if (!fired && trigger.test(log)) {
      fired = (async () => {
        // An action that races the run (stopping the daemon) goes first; a signal waits for the snapshot.
        if (act) {
          await act(child);
          return leftovers(work);
        }
        const during = await leftovers(work);
        child.kill(signal);
        return during;
      })();
    }
  });
  const r = await child;
  expect(fired, log).toBeDefined();
  return { code: r.exitCode ?? -1, log, during: await fired! };
}

/** The run stopped with the signal's status, said so, and undid everything. */
async function expectStoppedClean(r: Interrupted, signal: NodeJS.Signals): Promise<void> {
  expect(r.code, r.log).toBe(EXIT[signal]);
  const said = r.log.split('\n').filter((l) => l.startsWith('ddk2docker:'));
  expect(said, r.log).toEqual([`ddk2docker: ${signal}: stopping and cleaning up`, 'ddk2docker: interrupted']);
  expect(await leftovers(work), r.log).toEqual([]);
  expect(await imageIds(dockerd.host)).toEqual(baseline);
  expect(await tagTarget()).toBe(previous);
}

beforeAll(async () => {
  dockerd = await startDockerd();
  dir = await mkdtemp('/tmp/e2e-int-');
  work = await mkdtemp('/tmp/e2e-int-work-');
  mini = await buildMiniDdk(join(dir, 'mini'));
  big = await buildFixture();
  // TAG names an image before the tests: an interrupted run must give it back, not leave it dangling or gone.
  const tiny = join(dir, 'tiny');
  await mkdir(join(tiny, 'etc'), { recursive: true });
  await execa('sh', ['-c', 'echo previous > "$1/etc/marker" && tar -C "$1" -c . | docker import - "$2"', 'sh', tiny, TAG], { env: env() });
  previous = (await tagTarget())!;
  baseline = await imageIds(dockerd.host);
});

afterAll(async () => {
  await dockerd?.stop();
  await rm(dir, { recursive: true, force: true });
  await rm(work, { recursive: true, force: true });
});

describe.each(['builtin', 'host'] as const)('engine %s', (engine) => {
  const cases = STAGES.flatMap((stage) => SIGNALS.map((signal) => [stage, signal] as const));

  it.each(cases)('%s held, %s: stops, undoes it all, exit status of the signal', async (stage, signal) => {
    const r = await interrupt(['convert', mini.iso, '--engine', engine, '--tag', TAG, '--workdir', work], /\[OUTPUT\] held by DDK2DOCKER_TEST_HOLD/, signal, { DDK2DOCKER_TEST_HOLD: stage });
    // The held stage had made something to undo: at least the scratch directory; for the host
    // engine from extract on, a mount too (fuseiso, then the partition's loop device and mounts).
    expect(r.during.length, r.log).toBeGreaterThan(0);
    if (engine === 'host' && stage !== 'fetch') expect(r.during.some((l) => l.startsWith('mount: ')), r.during.join('\n')).toBe(true);
    await expectStoppedClean(r, signal);
  });

  it.each(['import', 'verify'])('%s held with a file output, SIGINT: the finished file is taken back', async (stage) => {
    const out = join(dir, `held-${engine}-${stage}.tar`);
    const r = await interrupt(['convert', mini.iso, '--engine', engine, '--output', `rootfs:${out}`, '--workdir', work], /\[OUTPUT\] held by DDK2DOCKER_TEST_HOLD/, 'SIGINT', { DDK2DOCKER_TEST_HOLD: stage });
    expect(r.code, r.log).toBe(130);
    expect(await stat(out).then(() => 'present', () => 'absent')).toBe('absent');
    expect((await readdir(dir)).filter((n) => n.startsWith('.held-') || n.startsWith('held-'))).toEqual([]);
    expect(await leftovers(work)).toEqual([]);
  });

  it('a rerun converts and tags', async () => {
    const r = await runCli(['convert', mini.iso, '--engine', engine, '--tag', TAG, '--workdir', work, '--quiet'], env());
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    await restoreTag();
    expect(await imageIds(dockerd.host)).toEqual(baseline);
    expect(await leftovers(work)).toEqual([]);
  });
});

describe('the slow stages of a large disk, interrupted mid-work', () => {
  const CASES: [string, 'builtin' | 'host', NodeJS.Signals, string][] = [
    ['decompress', 'builtin', 'SIGTERM', 'Decompress chunks'],
    ['decompress', 'host', 'SIGINT', 'Decompress chunks'],
    ['import', 'builtin', 'SIGINT', 'Import into Docker'],
  ];
  it.each(CASES)('%s (%s engine), %s', async (_stage, engine, signal, title) => {
    const r = await interrupt(['convert', big.iso, '--engine', engine, '--tag', TAG, '--workdir', work], new RegExp(`\\[STARTED\\] ${title}\\n`), signal);
    // Mid-work: the stage never completed.
    expect(r.log).not.toMatch(new RegExp(`\\[COMPLETED\\] ${title} \\(`));
    await expectStoppedClean(r, signal);
  });
});

describe('a signal as the last stage starts', () => {
  // Verify takes milliseconds on the mini disk: the signal lands while it runs, just after its work
  // is done, or once the run is complete. The run is then either stopped and undone, or complete
  // (exit 0, the new image tagged); never tagged and failed, never left half undone.
  it.each(['builtin', 'host'] as const)('engine %s, SIGTERM', async (engine) => {
    const args = ['convert', mini.iso, '--engine', engine, '--tag', TAG, '--workdir', work];
    const r = await interrupt(args, /\[STARTED\] Verify\n/, 'SIGTERM', {}, async (child) => {
      child.kill('SIGTERM');
    });
    if (r.code !== 0) {
      await expectStoppedClean(r, 'SIGTERM');
      return;
    }
    expect(r.log).toMatch(/\[COMPLETED\] Verify/);
    await restoreTag();
    expect(await imageIds(dockerd.host)).toEqual(baseline);
    expect(await leftovers(work)).toEqual([]);
  });
});

describe('a download interrupted mid-transfer', () => {
  let server: Server;
  let url: string;
  const ranges: string[] = [];

  /** Bytes of the download's .partial file in the cache, 0 until it exists. */
  async function partialBytes(cache: string): Promise<number> {
    // downloads/ holds the download's directory and, while a run holds it, its lock (KEY.lock).
    const key = (await readdir(join(cache, 'downloads')).catch(() => [])).find((n) => !n.endsWith('.lock'));
    if (key === undefined) return 0;
    const dir = join(cache, 'downloads', key);
    const partial = (await readdir(dir).catch(() => [])).find((f) => f.endsWith('.partial'));
    return partial ? (await stat(join(dir, partial)).catch(() => undefined))?.size ?? 0 : 0;
  }

  beforeAll(async () => {
    const size = (await stat(mini.iso)).size;
    // 64 KiB every 50 ms: the ISO takes over a second, time enough to be interrupted mid-transfer.
    server = createServer((req, res) => {
      const m = /^bytes=(\d+)-$/.exec(req.headers.range ?? '');
      ranges.push(req.headers.range ?? 'none');
      const start = m ? Number(m[1]) : 0;
      res.writeHead(m ? 206 : 200, { 'content-length': String(size - start), ...(m ? { 'content-range': `bytes ${start}-${size - 1}/${size}` } : {}) });
      const body = createReadStream(mini.iso, { start, highWaterMark: 64 << 10 });
      // Written by hand: pipe() resumes the file on every drain of the socket, undoing the pause.
      body.on('data', (piece) => {
        res.write(piece);
        body.pause();
        setTimeout(() => body.resume(), 50);
      });
      body.on('end', () => res.end());
      res.on('close', () => body.destroy());
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/ddk.iso`;
  });

  afterAll(async () => {
    await new Promise((r) => server?.close(r));
  });

  it.each(SIGNALS)('%s while fetching: stops clean; the rerun resumes the download and converts', async (signal) => {
    const cache = join(dir, `cache-${signal}`);
    ranges.length = 0;
    const args = ['convert', url, '--cache-dir', cache, '--tag', TAG, '--workdir', work];
    // The signal goes once the partial download on disk holds some of the ISO's 1.4 MiB.
    const r = await interrupt(args, /\[STARTED\] Fetch .*\n/, signal, {}, async (child) => {
      // Bounded by the run: one that ends before a byte is seen fails the assertions below instead of hanging here.
      let ended = false;
      void child.then(() => (ended = true));
      while (!ended && (await partialBytes(cache)) === 0) await new Promise((resolve) => setTimeout(resolve, 10));
      child.kill(signal);
    });
    expect(r.log).not.toMatch(/\[COMPLETED\] Fetch/);
    await expectStoppedClean(r, signal);
    const again = await runCli([...args, '--quiet'], env());
    expect(again.stderr).toBe('');
    expect(again.code).toBe(0);
    const resumed = ranges.slice(1);
    // The partial download was kept for resuming (cache, not scratch): the rerun asked for the rest only.
    expect(resumed.length, ranges.join(', ')).toBe(1);
    expect(Number(/^bytes=(\d+)-$/.exec(resumed[0]!)?.[1])).toBeGreaterThan(0);
    const sub = (await readdir(join(cache, 'downloads'))).filter((n) => !n.endsWith('.lock'));
    expect(sub).toHaveLength(1);
    expect((await readdir(join(cache, 'downloads', sub[0]!))).filter((f) => f.endsWith('.partial'))).toEqual([]);
    await restoreTag();
    expect(await leftovers(work)).toEqual([]);
  });
});

describe('a full file system', () => {
  let full: string;

  beforeAll(async () => {
    full = await mkdtemp('/tmp/e2e-int-full-');
    // 1 MiB: less than the mini disk's data (busybox alone is 2 MiB) and less than its layer.
    await execa('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', full]);
  });

  afterAll(async () => {
    await execa('umount', [full]);
    await rm(full, { recursive: true, force: true });
  });

  const OUTPUTS = ['rootfs:out.tar', 'rootfs:out.tar.gz', 'docker-archive:out.tar', 'oci:out'];
  describe.each(['builtin', 'host'] as const)('engine %s', (engine) => {
    it('as scratch space: one line naming the scratch file, nothing left', async () => {
      const scratch = join(full, 'w');
      const r = await runCli(['convert', mini.iso, '--engine', engine, '--tag', TAG, '--workdir', scratch, '--quiet'], env());
      expect(r.code).toBe(1);
      const lines = r.stderr.split('\n').filter(Boolean);
      expect(lines, r.stderr).toHaveLength(1);
      expect(lines[0]).toMatch(new RegExp(`^ddk2docker: ${scratch}/ddk2docker-\\w+/disk\\.img: .*no space left on device$`, 'i'));
      expect(await leftovers(scratch)).toEqual([]);
      expect(await imageIds(dockerd.host)).toEqual(baseline);
    });

    it.each(OUTPUTS)('under the output %s: one line naming it, no output, nothing left', async (target) => {
      const [kind, name] = target.split(':') as [string, string];
      const path = join(full, name);
      const r = await runCli(['convert', mini.iso, '--engine', engine, '--output', `${kind}:${path}`, '--workdir', work, '--quiet']);
      expect(r.code).toBe(1);
      const lines = r.stderr.split('\n').filter(Boolean);
      expect(lines, r.stderr).toHaveLength(1);
      expect(lines[0]).toBe(`ddk2docker: ${path}: no space left on device`);
      expect((await readdir(full)).filter((n) => n !== 'w')).toEqual([]);
      expect(await leftovers(work)).toEqual([]);
    });
  });

  it('a rerun with room converts', async () => {
    const out = join(dir, 'room.tar');
    const r = await runCli(['convert', mini.iso, '--output', `rootfs:${out}`, '--workdir', work, '--quiet']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    await rm(out);
  });
});

/**
 * The daemon told to stop (SIGTERM, as `systemctl stop docker` does) when the import starts: with
 * the builtin engine the import streams alongside the large disk's decompress; the host engine
 * imports once its export has begun, and the mini disk keeps the wait for that short. Either way
 * the daemon goes down before the layer is in.
 */
describe('the daemon stopped mid-import', () => {
  it.each(['builtin', 'host'] as const)('engine %s: one line naming the daemon; after a restart no image, the tag unchanged; a rerun converts', async (engine) => {
    const source = engine === 'builtin' ? big.iso : mini.iso;
    const r = await interrupt(['convert', source, '--engine', engine, '--tag', TAG, '--workdir', work], /\[STARTED\] Import into Docker\n/, 'SIGTERM', {}, async () => {
      // Straight to the daemon: the script's stop kills containers first, which takes a while.
      process.kill(Number(await readFile(join(dockerd.dir, 'dockerd.pid'), 'utf8')), 'SIGTERM');
      await execa(DOCKERD, ['stop', dockerd.dir]);
    });
    await execa(DOCKERD, ['start', dockerd.dir]);
    expect(r.log).not.toMatch(/\[COMPLETED\] Import into Docker/);
    expect(r.code, r.log).toBe(1);
    const said = r.log.split('\n').filter((l) => l.startsWith('ddk2docker:'));
    expect(said, r.log).toHaveLength(1);
    expect(said[0]).toMatch(/docker/i);
    expect(await leftovers(work), r.log).toEqual([]);
    expect(await imageIds(dockerd.host)).toEqual(baseline);
    expect(await tagTarget()).toBe(previous);

    const again = await runCli(['convert', mini.iso, '--engine', engine, '--tag', TAG, '--workdir', work, '--quiet'], env());
    expect(again.stderr).toBe('');
    expect(again.code).toBe(0);
    await restoreTag();
  });
});
