// The register stage and the XAPI commands of the built CLI, end to end: a real dockerd stands in
// for the Docker VM, the XAPI stand-in (real XML-RPC on loopback, xscontainer's semantics) has a
// monitor that reads that dockerd, and `ddk2docker convert --register-vm … --wait-monitoring`
// must see a container started from the image it has just imported.
import { randomUUID } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, type AddressInfo } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { leftovers, runCli, startCli, type CliResult } from '../helpers/cli.js';
import { startDockerd, type Dockerd } from '../helpers/dockerd.js';
import { buildFixture, type FixtureInfo } from '../helpers/fixtures.js';
import { imageIds } from '../helpers/images.js';
import { startXapiStandin, type XapiStandin } from '../helpers/xapi-standin.js';

const TAG = 'ddk-reg:1';
const LOGIN = 'session.login_with_password';

interface Monitored {
  id: string;
  image: string;
  imageId: string;
  command: string;
  status: string;
  state: string;
  names: string;
}

interface ConvertJson {
  image: { id: string; tag: string | null } | null;
  stages: { name: string; seconds: number }[];
  registered?: { vm: string; xapi: string; monitor: string; container?: Monitored; seconds?: number };
}

let dockerd: Dockerd;
let fixture: FixtureInfo;
let standin: XapiStandin;
/** The same VM on a pool without xscontainer installed. */
let bare: XapiStandin;
let work: string;
let imageId = '';
let containerId = '';

async function docker(...args: string[]): Promise<string> {
  return String((await execa('docker', args, { env: { DOCKER_HOST: dockerd.host } })).stdout).trim();
}

const env = (password = standin.password): Record<string, string> => ({
  DOCKER_HOST: dockerd.host,
  XAPI_USER: standin.user,
  XAPI_PASSWORD: password,
});

const xapiArgs = (x: XapiStandin = standin, vm = standin.vmUuid, url = x.url): string[] => ['--vm', vm, '--xapi', url];

/** Every recorded call that is not a login must be free of the password; logins must carry it. */
function expectPasswordOnlyInLogins(x: XapiStandin, password: string): void {
  const logins = x.calls.filter((c) => c.method === LOGIN);
  expect(logins.length).toBeGreaterThan(0);
  for (const c of logins) expect(c.body).toContain(password);
  for (const c of x.calls.filter((call) => call.method !== LOGIN)) {
    expect(c.body, c.method).not.toContain(password);
    expect(JSON.stringify(c.headers), c.method).not.toContain(password);
  }
}

/** A failure: exit 1, nothing on stdout, exactly one `ddk2docker: …` line on stderr. */
function expectOneLine(r: CliResult, message: RegExp, password = standin.password): void {
  expect(r.code, r.stderr).toBe(1);
  expect(r.stdout).toBe('');
  const lines = r.stderr.split('\n').filter(Boolean);
  expect(lines, r.stderr).toHaveLength(1);
  expect(lines[0]).toMatch(/^ddk2docker: /);
  expect(lines[0]).toMatch(message);
  expect(r.stderr).not.toContain(password);
}

/** Runs a CLI command and returns it with the stand-in's calls it caused. */
async function counted(x: XapiStandin, args: string[], e: Record<string, string>): Promise<{ r: CliResult; methods: string[] }> {
  const before = x.calls.length;
  const r = await runCli(args, e);
  return { r, methods: x.calls.slice(before).map((c) => c.method) };
}

async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

beforeAll(async () => {
  [dockerd, fixture] = await Promise.all([startDockerd(), buildFixture()]);
  standin = await startXapiStandin({ dockerHost: dockerd.host, monitorIntervalMs: 500 });
  bare = await startXapiStandin({ plugin: false, vms: [standin.vmUuid] });
  work = await mkdtemp('/tmp/e2e-reg-');
});

afterAll(async () => {
  await standin?.close();
  await bare?.close();
  await dockerd?.stop();
  if (work !== undefined) await rm(work, { recursive: true, force: true });
});

describe('convert --register-vm against the XAPI stand-in', () => {
  it('imports, registers, and waits until the monitor reports a container of the new image', async () => {
    const child = startCli(
      ['convert', fixture.iso, '--tag', TAG, '--register-vm', standin.vmUuid, '--xapi', standin.url,
        '--wait-monitoring', '60', '--workdir', work, '--json'],
      env(),
    );
    let log = '';
    const registering = new Promise<void>((resolve, reject) => {
      child.stderr!.on('data', (b: Buffer) => {
        log += b.toString();
        if (log.includes(`[STARTED] Register VM ${standin.vmUuid}`)) resolve();
      });
      void child.then(() => reject(new Error(`convert ended before registering:\n${log}`)));
    });
    await registering;

    // The image is in the daemon now (imported, verified, tagged): start a container from it by id.
    const labelled = (await docker('images', '--filter', 'label=ddk2docker.source.name', '--quiet', '--no-trunc')).split('\n');
    expect(labelled).toHaveLength(1);
    imageId = labelled[0]!;
    expect(imageId).toMatch(/^sha256:[0-9a-f]{64}$/);
    containerId = await docker('run', '-d', '--network', 'none', '--stop-timeout', '1', '--name', 'ddk-reg-c', imageId,
      '/bin/busybox', 'sleep', '120');

    const r = await child;
    expect(r.exitCode, log).toBe(0);
    const out = JSON.parse(String(r.stdout)) as ConvertJson;
    expect(out.image).toEqual({ id: imageId, tag: TAG });
    expect(out.stages.map((s) => s.name)).toContain('register');
    expect(out.registered).toMatchObject({ vm: standin.vmUuid, xapi: standin.url, monitor: 'True' });
    expect(out.registered!.container).toMatchObject({
      id: containerId,
      imageId,
      command: '/bin/busybox sleep 120',
      status: 'Up',
      state: 'running',
      names: 'ddk-reg-c',
    });
    // Docker reports the image as the container was created from it: here, by id.
    expect([imageId, TAG]).toContain(out.registered!.container!.image);
    expect(out.registered!.seconds).toBeGreaterThan(0);
    expect(out.registered!.seconds).toBeLessThan(60);

    expect(standin.vms.get(standin.vmUuid)!.otherConfig['xscontainer-monitor']).toBe('True');
    const methods = standin.calls.map((c) => c.method);
    expect(methods).toContain('host.call_plugin');
    expect(methods.filter((m) => m === 'session.logout')).toHaveLength(methods.filter((m) => m === LOGIN).length);
    expect(standin.openSessions()).toBe(0);

    expect(String(r.stdout)).not.toContain(standin.password);
    expect(log).not.toContain(standin.password);
    expectPasswordOnlyInLogins(standin, standin.password);
    expect(await leftovers(work)).toEqual([]);
  });

  it('containers lists it, container stop stops it for real, deregister clears the keys', async () => {
    expect(containerId).not.toBe('');
    const list = await runCli(['containers', ...xapiArgs(), '--json'], env());
    expect(list.code, list.stderr).toBe(0);
    const listed = JSON.parse(list.stdout) as Monitored[];
    expect(listed.find((c) => c.id === containerId)).toMatchObject({ imageId, status: 'Up', names: 'ddk-reg-c' });

    const stop = await runCli(['container', 'stop', containerId.slice(0, 12), ...xapiArgs()], env());
    expect(stop.code, stop.stderr).toBe(0);
    expect(stop.stdout).toBe(`stop ${containerId.slice(0, 12)}: done`);
    expect(await docker('inspect', '-f', '{{.State.Running}}', containerId)).toBe('false');

    // The monitor notices on its next tick.
    const deadline = Date.now() + 15_000;
    for (;;) {
      const again = JSON.parse((await runCli(['containers', ...xapiArgs(), '--json'], env())).stdout) as Monitored[];
      const entry = again.find((c) => c.id === containerId);
      if (entry?.status.startsWith('Exited (')) break;
      if (Date.now() > deadline) throw new Error(`docker_ps never showed the container stopped: ${JSON.stringify(entry)}`);
      await sleep(300);
    }

    const dereg = await runCli(['deregister', ...xapiArgs(), '--json'], env());
    expect(dereg.code, dereg.stderr).toBe(0);
    expect(JSON.parse(dereg.stdout)).toEqual({ vm: standin.vmUuid, xapi: standin.url, monitor: 'False' });
    await sleep(1200); // two monitor intervals: a stopped monitor writes nothing more
    expect(standin.vms.get(standin.vmUuid)!.otherConfig).toEqual({ 'xscontainer-monitor': 'False' });

    const gone = await runCli(['containers', ...xapiArgs()], env());
    expectOneLine(gone, /is not registered for container monitoring/);
    expect(standin.openSessions()).toBe(0);
    expectPasswordOnlyInLogins(standin, standin.password);
  });
});

describe('failures: one line, non-zero exit, session logged out', () => {
  const WRONG = 'not-the-password-4711';

  it.each([['register'], ['deregister'], ['containers']])('%s: every XAPI failure', async (command) => {
    const wrong = await counted(standin, [command, ...xapiArgs()], env(WRONG));
    expectOneLine(wrong.r, new RegExp(`^ddk2docker: XAPI at ${standin.url} rejected the credentials of user ${standin.user}$`), WRONG);
    expect(wrong.methods).toEqual([LOGIN]);
    expect(standin.calls.at(-1)!.body).toContain(WRONG);

    const unknown = randomUUID();
    const noVm = await counted(standin, [command, ...xapiArgs(standin, unknown)], env());
    expectOneLine(noVm.r, new RegExp(`XAPI at ${standin.url} has no VM with uuid ${unknown}$`));
    expect(noVm.methods).toEqual([LOGIN, 'VM.get_by_uuid', 'session.logout']);
    expect(standin.openSessions()).toBe(0);

    if (command !== 'containers') {
      // containers only reads other_config: it never calls the plugin.
      const noPlugin = await counted(bare, [command, ...xapiArgs(bare)], env());
      expectOneLine(noPlugin.r, /the xscontainer plugin is not installed on the pool master behind .*: install XenServer Container Management/);
      expect(noPlugin.methods.at(-1)).toBe('session.logout');
      expect(noPlugin.methods).toContain('host.call_plugin');
      expect(bare.openSessions()).toBe(0);
    }

    const port = await closedPort();
    const unreachable = await runCli([command, ...xapiArgs(standin, standin.vmUuid, `http://127.0.0.1:${port}`)], env());
    expectOneLine(unreachable, new RegExp(`^ddk2docker: cannot reach XAPI at http://127\\.0\\.0\\.1:${port}: .*ECONNREFUSED`));
  });

  it('container stop on a pool without xscontainer', async () => {
    const { r, methods } = await counted(bare, ['container', 'stop', 'ddk-reg-c', ...xapiArgs(bare)], env());
    expectOneLine(r, /the xscontainer plugin is not installed/);
    expect(methods.at(-1)).toBe('session.logout');
    expect(bare.openSessions()).toBe(0);
  });

  const badConvert = (tag: string) =>
    counted(
      standin,
      ['convert', fixture.iso, '--tag', tag, '--register-vm', standin.vmUuid, '--xapi', standin.url,
        '--wait-monitoring', '5', '--workdir', work, '--quiet', '--json'],
      env(WRONG),
    );

  it('convert with a wrong password fails and removes the image it imported', async () => {
    const before = await imageIds(dockerd.host);
    const { r, methods } = await badConvert('ddk-reg:bad');
    expectOneLine(r, new RegExp(`^ddk2docker: XAPI at ${standin.url} rejected the credentials of user ${standin.user}$`), WRONG);
    expect(methods).toEqual([LOGIN]);
    expect(standin.openSessions()).toBe(0);
    expect(await imageIds(dockerd.host)).toEqual(before);
    expect(await leftovers(work)).toEqual([]);
    // No half-tagged image: the tag it was to get names nothing.
    await expect(docker('image', 'inspect', 'ddk-reg:bad')).rejects.toThrow(/No such image/i);
  });

  // verify tags the new image before register runs, so a failed registration must give the tag
  // back to the image it named before.
  it('convert with a wrong password leaves an existing tag on its image', async () => {
    expect(imageId).not.toBe('');
    const { r } = await badConvert(TAG);
    expect(r.code).toBe(1);
    expect(await docker('image', 'inspect', '-f', '{{.Id}}', TAG)).toBe(imageId);
  });

  it('--register-vm without --xapi is a usage error', async () => {
    const before = await imageIds(dockerd.host);
    const r = await runCli(['convert', fixture.iso, '--tag', 'ddk-reg:2', '--register-vm', standin.vmUuid, '--workdir', work, '--quiet'], env());
    expectOneLine(r, /^ddk2docker: --register-vm needs --xapi URL$/);
    expect(await imageIds(dockerd.host)).toEqual(before);
    expect(await leftovers(work)).toEqual([]);
  });
});
