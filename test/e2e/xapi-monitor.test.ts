// xscontainer monitoring end to end: a real dockerd stands in for the VM's Docker, the XAPI
// stand-in's monitor reads it as xscontainer would, and our functions drive it over XML-RPC.
import { copyFile, mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  containerAction,
  deregister,
  listContainers,
  register,
  waitMonitoring,
  withXapiSession,
  type MonitoredContainer,
} from '../../src/xapi/index.js';
import { startDockerd, type Dockerd } from '../helpers/dockerd.js';
import { startXapiStandin, type XapiStandin } from '../helpers/xapi-standin.js';

const TAG = 'ddk2docker-e2e/xapi-busybox:1';

let dockerd: Dockerd;
let standin: XapiStandin;
let work: string;
let imageId: string;
let containerId: string;

async function docker(...args: string[]): Promise<string> {
  const { stdout } = await execa('docker', args, { env: { DOCKER_HOST: dockerd.host } });
  return stdout.trim();
}

const options = () => ({
  xapi: standin.url,
  vm: standin.vmUuid,
  env: { XAPI_USER: standin.user, XAPI_PASSWORD: standin.password },
});

/** Polls listContainers until the container's entry satisfies `ok` (the monitor ticks every second). */
async function until(ok: (c: MonitoredContainer) => boolean): Promise<MonitoredContainer> {
  const deadline = Date.now() + 30_000;
  while (true) {
    const entry = (await listContainers(options())).find((c) => c.id === containerId);
    if (entry !== undefined && ok(entry)) return entry;
    if (Date.now() > deadline) throw new Error(`docker_ps never showed the expected state: ${JSON.stringify(entry)}`);
    await sleep(250);
  }
}

beforeAll(async () => {
  dockerd = await startDockerd();
  work = await mkdtemp(join(tmpdir(), 'xapi-e2e-'));
  const root = join(work, 'root');
  await mkdir(join(root, 'bin'), { recursive: true });
  await copyFile('/bin/busybox', join(root, 'bin', 'busybox'));
  const tarFile = join(work, 'rootfs.tar');
  await execa('tar', ['-C', root, '-cf', tarFile, '.']);
  imageId = await docker('import', tarFile, TAG);
  containerId = await docker(
    'run', '-d', '--network', 'none', '--stop-timeout', '1', '--name', 'xs-e2e', TAG, '/bin/busybox', 'sleep', '600',
  );
  standin = await startXapiStandin({ dockerHost: dockerd.host, monitorIntervalMs: 1000 });
});

afterAll(async () => {
  await standin?.close();
  await dockerd?.stop();
  if (work !== undefined) await rm(work, { recursive: true, force: true });
});

describe('xscontainer monitoring against a real dockerd', () => {
  it('registers the VM and sees the container from the new image in docker_ps', async () => {
    await expect(register(options())).resolves.toEqual({ vm: standin.vmUuid, xapi: standin.url, monitor: 'True' });

    const found = await waitMonitoring({ ...options(), image: [imageId, TAG], timeoutSeconds: 60 });
    expect(found.container).toMatchObject({
      id: containerId,
      image: TAG,
      imageId,
      command: '/bin/busybox sleep 600',
      status: 'Up',
      state: 'running',
      names: 'xs-e2e',
    });
    // By id alone too, as the pipeline knows it right after the import.
    await expect(waitMonitoring({ ...options(), image: imageId, timeoutSeconds: 5 })).resolves.toBeDefined();

    const config = standin.vms.get(standin.vmUuid)!.otherConfig;
    expect(config.docker_info).toMatch(/^<\?xml[^>]*\?><docker_info>.*<ServerVersion>[^<]+<\/ServerVersion>/);
    expect(config.docker_version).toMatch(/^<\?xml[^>]*\?><docker_version>.*<ApiVersion>[^<]+<\/ApiVersion>/);

    const listed = await listContainers(options());
    expect(listed.map((c) => c.id)).toEqual([containerId]);
    expect(standin.openSessions()).toBe(0);
  });

  it('get_inspect and get_top answer through the plugin', async () => {
    await withXapiSession(options(), async (session) => {
      const inspect = await session.callPlugin('xscontainer', 'get_inspect', {
        vmuuid: standin.vmUuid,
        object: containerId,
      });
      expect(inspect).toMatch(new RegExp(`^True<\\?xml[^>]*\\?><docker_inspect>.*<Id>${containerId}</Id>`));
      const top = await session.callPlugin('xscontainer', 'get_top', { vmuuid: standin.vmUuid, object: containerId });
      expect(top).toMatch(/^True<\?xml[^>]*\?><docker_top><item><Process>.*sleep 600/);
    });
  });

  it('stops, starts, pauses and unpauses the container for real', async () => {
    const short = containerId.slice(0, 12);
    const running = () => docker('inspect', '-f', '{{.State.Status}}', containerId);

    await expect(containerAction('stop', { ...options(), container: short })).resolves.toMatchObject({ output: '' });
    expect(await running()).toBe('exited');
    await until((c) => c.status.startsWith('Exited ('));

    // A second stop is refused by Docker (304); xscontainer's message arrives on one line.
    await expect(containerAction('stop', { ...options(), container: short })).rejects.toThrow(
      new RegExp(
        `^xscontainer stop failed on XAPI at ${standin.url}: Request 'POST /containers/${short}/stop HTTP/1.0 ' ` +
          'led to status Not Modified - Container Management Error: The requested operation is currently not possible',
      ),
    );

    await containerAction('start', { ...options(), container: 'xs-e2e' });
    expect(await running()).toBe('running');
    await until((c) => c.status === 'Up');

    await containerAction('pause', { ...options(), container: short });
    expect(await running()).toBe('paused');
    // xscontainer rewrites docker_ps right after pause, without waiting for the monitor.
    const paused = (await listContainers(options())).find((c) => c.id === containerId);
    expect(paused?.status).toBe('Up (Paused)');

    await containerAction('unpause', { ...options(), container: short });
    expect(await running()).toBe('running');
    expect(standin.openSessions()).toBe(0);
  });

  it('deregisters: the docker keys go and the monitor stops writing them', async () => {
    await expect(deregister(options())).resolves.toMatchObject({ monitor: 'False' });
    await sleep(2500);
    const config = standin.vms.get(standin.vmUuid)!.otherConfig;
    expect(config).toEqual({ 'xscontainer-monitor': 'False' });
    await expect(listContainers(options())).rejects.toThrow(/is not registered for container monitoring/);
    expect(standin.openSessions()).toBe(0);
  });
});
