import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { CancelledError, InputError } from '../../src/errors.js';
import {
  containerAction,
  deregister,
  fromImage,
  listContainers,
  parseDockerPs,
  register,
  waitMonitoring,
  withXapiSession,
  XapiError,
} from '../../src/xapi/index.js';
import {
  dockerPsXml,
  makeTestCertificate,
  startXapiPool,
  startXapiStandin,
  type XapiStandin,
} from '../helpers/xapi-standin.js';

const UNKNOWN_VM = '00000000-1111-2222-3333-444444444444';
const IMAGE_ID = `sha256:${'ab12'.repeat(16)}`;
const CONTAINER_ID = 'c0ffee'.repeat(10) + 'c0ff';

const standins: { close(): Promise<void> }[] = [];
async function standin(options: Parameters<typeof startXapiStandin>[0] = {}): Promise<XapiStandin> {
  const s = await startXapiStandin(options);
  standins.push(s);
  return s;
}
afterEach(async () => {
  await Promise.all(standins.splice(0).map((s) => s.close()));
});

const env = (s: XapiStandin, password = s.password) => ({ XAPI_USER: s.user, XAPI_PASSWORD: password });

/** The failure, checked to be one line without the password anywhere (message, fields, JSON). */
async function failure(promise: Promise<unknown>, password: string): Promise<Error> {
  const error = await promise.then(
    () => {
      throw new Error('expected a failure');
    },
    (e: unknown) => e as Error,
  );
  expect(error).toBeInstanceOf(Error);
  expect(error.message).not.toMatch(/[\r\n]/);
  expect(error.message).not.toContain(password);
  expect(JSON.stringify({ ...error, message: error.message })).not.toContain(password);
  return error;
}

/** Every session opened was logged out, and the password went out in login calls only. */
function expectClean(s: XapiStandin): void {
  expect(s.openSessions()).toBe(0);
  for (const call of s.calls) {
    if (call.method === 'session.login_with_password') continue;
    expect(call.body).not.toContain(s.password);
    expect(JSON.stringify(call.headers)).not.toContain(s.password);
  }
  expect(JSON.stringify(s.calls.map((c) => c.headers))).not.toContain(s.password);
}

function psEntry(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    Id: CONTAINER_ID,
    Names: ['/builder'],
    Image: 'ddk:8.2',
    ImageID: IMAGE_ID,
    Command: `sh -c 'make && echo "done" > /tmp/log'`,
    Created: 1700000000,
    Ports: [],
    Labels: { 'org.opencontainers.image.title': 'ddk', 'a/b': 'slash' },
    State: 'running',
    Status: 'Up 3 minutes',
    HostConfig: { NetworkMode: 'none' },
    SizeRw: 0,
    SizeRootFs: 123456,
    ...overrides,
  };
}

describe('parseDockerPs', () => {
  it('reads the document exactly as xscontainer (Python 2 minidom) writes it', () => {
    // Hand-written in minidom's output format: text went through saxutils.escape, then minidom's
    // own escaping, so "&&" arrives as &amp;amp;&amp;amp; and quotes as &quot;.
    const xml =
      '<?xml version="1.0" ?><docker_ps><item><entry><status>Up</status><created>1700000000</created>' +
      '<image>ddk:8.2</image><labels><SPECIAL_XS_ENCODED_ELEMENT name="a/b">x</SPECIAL_XS_ENCODED_ELEMENT></labels>' +
      '<ports/><sizerw>0</sizerw><command>sh -c \'make &amp;amp;&amp;amp; echo &quot;done&quot; &amp;gt; /tmp/log\'</command>' +
      `<names>builder</names><id>${CONTAINER_ID}</id><imageid>${IMAGE_ID}</imageid>` +
      `<container>${CONTAINER_ID.slice(0, 10)}</container><state>running</state></entry></item>` +
      '<item><entry><status>Exited (0)</status><created>1600000000</created><image>busybox</image>' +
      '<command>true</command><names>old</names><id>0123456789ab</id><imageid>sha256:0123</imageid></entry></item>' +
      '</docker_ps>';
    expect(parseDockerPs(xml)).toEqual([
      {
        id: CONTAINER_ID,
        image: 'ddk:8.2',
        imageId: IMAGE_ID,
        command: `sh -c 'make && echo "done" > /tmp/log'`,
        created: 1700000000,
        status: 'Up',
        state: 'running',
        names: 'builder',
      },
      {
        id: '0123456789ab',
        image: 'busybox',
        imageId: 'sha256:0123',
        command: 'true',
        created: 1600000000,
        status: 'Exited (0)',
        state: '',
        names: 'old',
      },
    ]);
  });

  it('reads an empty list and refuses what is not docker_ps', () => {
    expect(parseDockerPs('<?xml version="1.0" ?><docker_ps/>')).toEqual([]);
    expect(() => parseDockerPs('<docker_info><x>1</x></docker_info>')).toThrow(/not xscontainer's docker_ps/);
    expect(() => parseDockerPs('<docker_ps><item>')).toThrow(/not well-formed XML/);
  });

  it('round-trips what the stand-in writes from Docker JSON', () => {
    const [c] = parseDockerPs(dockerPsXml([psEntry()]));
    expect(c).toMatchObject({
      id: CONTAINER_ID,
      names: 'builder',
      status: 'Up',
      command: `sh -c 'make && echo "done" > /tmp/log'`,
    });
  });
});

describe('fromImage', () => {
  const c = parseDockerPs(dockerPsXml([psEntry()]))[0]!;
  it('matches by id, id prefix and name with an implied tag', () => {
    expect(fromImage(c, [IMAGE_ID])).toBe(true);
    expect(fromImage(c, [IMAGE_ID.slice(7, 19)])).toBe(true);
    expect(fromImage(c, ['ddk:8.2'])).toBe(true);
    expect(fromImage(c, ['docker.io/library/ddk:8.2'])).toBe(true);
    expect(fromImage(c, ['ddk'])).toBe(false);
    expect(fromImage(c, [`sha256:${'cd34'.repeat(16)}`, 'other:1'])).toBe(false);
    const byLatest = parseDockerPs(dockerPsXml([psEntry({ Image: 'busybox' })]))[0]!;
    expect(fromImage(byLatest, ['busybox:latest'])).toBe(true);
  });
});

describe('register and deregister', () => {
  it('registers through the plugin on the master, confirms other_config and logs out', async () => {
    const s = await standin();
    await expect(register({ xapi: s.url, vm: s.vmUuid, env: env(s) })).resolves.toEqual({
      vm: s.vmUuid,
      xapi: s.url,
      monitor: 'True',
    });
    expect(s.vms.get(s.vmUuid)!.otherConfig['xscontainer-monitor']).toBe('True');
    const plugin = s.calls.find((c) => c.method === 'host.call_plugin')!;
    expect(plugin.params.slice(2)).toEqual(['xscontainer', 'register', { vmuuid: s.vmUuid }]);
    expect(s.calls.at(-1)!.method).toBe('session.logout');
    expectClean(s);
  });

  it('deregisters and confirms the docker keys are gone', async () => {
    const s = await standin();
    const config = s.vms.get(s.vmUuid)!.otherConfig;
    Object.assign(config, { 'xscontainer-monitor': 'True', docker_ps: '<docker_ps/>', docker_info: 'i', docker_version: 'v' });
    await expect(deregister({ xapi: s.url, vm: s.vmUuid, env: env(s) })).resolves.toMatchObject({ monitor: 'False' });
    expect(config).toEqual({ 'xscontainer-monitor': 'False' });
    expectClean(s);
  });
});

describe('listContainers and waitMonitoring', () => {
  it('lists what the monitor reported', async () => {
    const s = await standin();
    Object.assign(s.vms.get(s.vmUuid)!.otherConfig, {
      'xscontainer-monitor': 'True',
      docker_ps: dockerPsXml([psEntry(), psEntry({ Id: 'f'.repeat(64), Names: ['/b'], Status: 'Exited (137) 2 hours ago' })]),
    });
    const list = await listContainers({ xapi: s.url, vm: s.vmUuid, env: env(s) });
    expect(list.map((c) => [c.names, c.status])).toEqual([
      ['builder', 'Up'],
      ['b', 'Exited (137)'],
    ]);
    expectClean(s);
  });

  it('says why there is nothing to list', async () => {
    const s = await standin();
    const options = { xapi: s.url, vm: s.vmUuid, env: env(s) };
    const notRegistered = await failure(listContainers(options), s.password);
    expect(notRegistered.message).toBe(
      `VM ${s.vmUuid} is not registered for container monitoring (other_config xscontainer-monitor is absent): register it first`,
    );
    s.vms.get(s.vmUuid)!.otherConfig['xscontainer-monitor'] = 'True';
    const notYet = await failure(listContainers(options), s.password);
    expect(notYet.message).toMatch(/has not reported its containers yet .*xscontainer-prepare-vm/);
    expectClean(s);
  });

  it('waits until a container from the image shows up in docker_ps', async () => {
    const s = await standin();
    const config = s.vms.get(s.vmUuid)!.otherConfig;
    config['xscontainer-monitor'] = 'True';
    config.docker_ps = dockerPsXml([psEntry({ Image: 'other', ImageID: `sha256:${'9'.repeat(64)}` })]);
    const later = setTimeout(() => (config.docker_ps = dockerPsXml([psEntry()])), 1200);
    try {
      const result = await waitMonitoring({
        xapi: s.url,
        vm: s.vmUuid,
        env: env(s),
        image: [IMAGE_ID, 'ddk:8.2'],
        timeoutSeconds: 20,
        intervalSeconds: 0.2,
      });
      expect(result.container.id).toBe(CONTAINER_ID);
      expect(result.seconds).toBeGreaterThanOrEqual(1);
    } finally {
      clearTimeout(later);
    }
    // One session for the whole wait.
    expect(s.calls.filter((c) => c.method === 'session.login_with_password')).toHaveLength(1);
    expectClean(s);
  });

  it('reports a container caught between docker run\'s create and start once it runs; a created-only one when time runs out', async () => {
    const s = await standin();
    const config = s.vms.get(s.vmUuid)!.otherConfig;
    config['xscontainer-monitor'] = 'True';
    const created = psEntry({ State: 'created', Status: 'Created' });
    config.docker_ps = dockerPsXml([created]);
    const later = setTimeout(() => (config.docker_ps = dockerPsXml([psEntry()])), 1000);
    try {
      const result = await waitMonitoring({ xapi: s.url, vm: s.vmUuid, env: env(s), image: IMAGE_ID, timeoutSeconds: 20, intervalSeconds: 0.2 });
      expect(result.container).toMatchObject({ id: CONTAINER_ID, state: 'running', status: 'Up' });
      expect(result.seconds).toBeGreaterThanOrEqual(0.9);
    } finally {
      clearTimeout(later);
    }
    config.docker_ps = dockerPsXml([created]);
    const onlyCreated = await waitMonitoring({ xapi: s.url, vm: s.vmUuid, env: env(s), image: IMAGE_ID, timeoutSeconds: 1, intervalSeconds: 0.2 });
    expect(onlyCreated.container).toMatchObject({ id: CONTAINER_ID, state: 'created', status: 'Created' });
    expect(onlyCreated.seconds).toBeGreaterThanOrEqual(1);
    expectClean(s);
  });

  it('fails clearly when the time runs out, and logs out', async () => {
    const s = await standin();
    const config = s.vms.get(s.vmUuid)!.otherConfig;
    config['xscontainer-monitor'] = 'True';
    const options = { xapi: s.url, vm: s.vmUuid, env: env(s), image: 'ddk:8.2', timeoutSeconds: 1, intervalSeconds: 0.2 };
    const never = await failure(waitMonitoring(options), s.password);
    expect(never).toMatchObject({ code: 'MONITOR_TIMEOUT' });
    expect(never.message).toBe(
      `no container from image ddk:8.2 appeared in docker_ps of VM ${s.vmUuid} within 1 s; ` +
        "xscontainer's monitor has not reported the VM's containers at all: check that the VM runs, " +
        'was prepared with xscontainer-prepare-vm and runs Docker',
    );
    config.docker_ps = dockerPsXml([psEntry({ Image: 'busybox', ImageID: `sha256:${'9'.repeat(64)}` })]);
    const other = await failure(waitMonitoring(options), s.password);
    expect(other.message).toMatch(/within 1 s; docker_ps lists 1 container\(s\), from busybox$/);
    expectClean(s);
  });

  it('refuses to wait for a VM that is not registered', async () => {
    const s = await standin();
    const error = await failure(
      waitMonitoring({ xapi: s.url, vm: s.vmUuid, env: env(s), image: 'x', timeoutSeconds: 60 }),
      s.password,
    );
    expect(error).toMatchObject({ code: 'NOT_REGISTERED' });
    expectClean(s);
  });

  it('stops waiting when cancelled, and still logs out', async () => {
    const s = await standin();
    s.vms.get(s.vmUuid)!.otherConfig['xscontainer-monitor'] = 'True';
    const controller = new AbortController();
    setTimeout(() => controller.abort(), 300);
    const wait = waitMonitoring({
      xapi: s.url,
      vm: s.vmUuid,
      env: env(s),
      image: 'x',
      timeoutSeconds: 60,
      signal: controller.signal,
    });
    await expect(wait).rejects.toBeInstanceOf(CancelledError);
    expectClean(s);
  });
});

describe('containerAction', () => {
  it("reports the plugin's failure in one line", async () => {
    const s = await standin();
    const error = await failure(
      containerAction('stop', { xapi: s.url, vm: s.vmUuid, env: env(s), container: 'builder' }),
      s.password,
    );
    expect(error).toMatchObject({ code: 'XENAPI_PLUGIN_FAILURE' });
    expect(error.message).toBe(
      `xscontainer stop failed on XAPI at ${s.url}: Unable to find the Docker unix socket at /var/run/docker.sock. ` +
        'Please install and run Docker.',
    );
    const plugin = s.calls.find((c) => c.method === 'host.call_plugin')!;
    expect(plugin.params.slice(2)).toEqual(['xscontainer', 'stop', { vmuuid: s.vmUuid, container: 'builder' }]);
    expectClean(s);
  });

  it('refuses bad arguments before calling XAPI', async () => {
    const s = await standin();
    const base = { xapi: s.url, vm: s.vmUuid, env: env(s) };
    await expect(containerAction('stop', { ...base, container: 'a;rm -rf' })).rejects.toThrow(
      /not a container id or name xscontainer accepts/,
    );
    await expect(containerAction('kill' as 'stop', { ...base, container: 'a' })).rejects.toThrow(
      /kill: not a container action/,
    );
    await expect(register({ ...base, vm: 'not-a-uuid' })).rejects.toThrow(/not-a-uuid: not a VM uuid/);
    expect(s.calls).toEqual([]);
  });
});

describe('failures', () => {
  it('SESSION_AUTHENTICATION_FAILED names the URL and the user', async () => {
    const s = await standin();
    const wrong = 'not-the-password';
    const error = await failure(register({ xapi: s.url, vm: s.vmUuid, env: env(s, wrong) }), wrong);
    expect(error.message).toBe(`XAPI at ${s.url} rejected the credentials of user root`);
    expect(error).toMatchObject({ code: 'SESSION_AUTHENTICATION_FAILED' });
    expect(s.calls.map((c) => c.method)).toEqual(['session.login_with_password']);
    expectClean(s);
  });

  it('UUID_INVALID says there is no such VM', async () => {
    const s = await standin();
    const error = await failure(register({ xapi: s.url, vm: UNKNOWN_VM, env: env(s) }), s.password);
    expect(error.message).toBe(`XAPI at ${s.url} has no VM with uuid ${UNKNOWN_VM}`);
    expect(s.calls.at(-1)!.method).toBe('session.logout');
    expectClean(s);
  });

  it('XENAPI_MISSING_PLUGIN says xscontainer is not installed', async () => {
    const s = await standin({ plugin: false });
    const error = await failure(register({ xapi: s.url, vm: s.vmUuid, env: env(s) }), s.password);
    expect(error).toMatchObject({ code: 'XENAPI_MISSING_PLUGIN' });
    expect(error.message).toBe(
      `the xscontainer plugin is not installed on the pool master behind ${s.url}: ` +
        'install XenServer Container Management (the xscontainer supplemental pack) on the pool',
    );
    expectClean(s);
  });

  it('UNKNOWN_XENAPI_PLUGIN_FUNCTION names the function', async () => {
    const s = await standin({ functions: ['deregister'] });
    const error = await failure(register({ xapi: s.url, vm: s.vmUuid, env: env(s) }), s.password);
    expect(error.message).toBe(
      `the xscontainer plugin at ${s.url} has no function register: its version is too old or it is not xscontainer`,
    );
    expectClean(s);
  });

  it('an unreachable host names the URL', async () => {
    const closed = http.createServer();
    await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
    const { port } = closed.address() as AddressInfo;
    await new Promise((resolve) => closed.close(resolve));
    const url = `http://127.0.0.1:${port}`;
    const error = await failure(
      register({ xapi: url, vm: UNKNOWN_VM, env: { XAPI_USER: 'root', XAPI_PASSWORD: 'pw-unreachable' } }),
      'pw-unreachable',
    );
    expect(error.message).toBe(`cannot reach XAPI at ${url}: connect ECONNREFUSED 127.0.0.1:${port}`);
  });

  it('a server that is not XAPI is named as such', async () => {
    const web = http.createServer((_req, res) => res.writeHead(404).end('nope'));
    await new Promise<void>((resolve) => web.listen(0, '127.0.0.1', resolve));
    try {
      const url = `http://127.0.0.1:${(web.address() as AddressInfo).port}`;
      const error = await failure(
        register({ xapi: url, vm: UNKNOWN_VM, env: { XAPI_USER: 'root', XAPI_PASSWORD: 'pw' } }),
        'pw-never-used',
      );
      expect(error.message).toBe(`XAPI at ${url} answered HTTP 404 Not Found`);
    } finally {
      web.closeAllConnections();
      await new Promise((resolve) => web.close(resolve));
    }
  });

  it('needs XAPI_USER and XAPI_PASSWORD, and refuses credentials in the URL', async () => {
    const s = await standin();
    await expect(register({ xapi: s.url, vm: s.vmUuid, env: {} })).rejects.toThrow(
      `set XAPI_USER and XAPI_PASSWORD in the environment to log in to XAPI at ${s.url}`,
    );
    const inUrl = s.url.replace('//', `//root:${s.password}@`);
    const error = await failure(register({ xapi: inUrl, vm: s.vmUuid, env: env(s) }), s.password);
    expect(error.message).toBe(
      `the XAPI URL for ${s.address}:${s.port} must not contain credentials: set XAPI_USER and XAPI_PASSWORD instead`,
    );
    const malformed = await failure(register({ xapi: 'https://root:pw-typo@[bad', vm: 'nope', env: env(s) }), 'pw-typo');
    expect(malformed.message).toBe('https://***@[bad: not a valid XAPI URL (expected https://HOST or http://HOST)');
    expect(s.calls).toEqual([]);
  });

  it('a failure inside the session still logs out', async () => {
    const s = await standin();
    await expect(
      withXapiSession({ xapi: s.url, env: env(s) }, async () => {
        throw new Error('boom');
      }),
    ).rejects.toThrow('boom');
    expect(s.calls.map((c) => c.method)).toEqual(['session.login_with_password', 'session.logout']);
    expectClean(s);
  });
});

describe('HOST_IS_SLAVE', () => {
  it('follows the member to the pool master and works there', async () => {
    const pool = await startXapiPool();
    standins.push(pool);
    const { master, member } = pool;
    const result = await register({ xapi: member.url, vm: master.vmUuid, env: env(master) });
    expect(result).toEqual({ vm: master.vmUuid, xapi: master.url, monitor: 'True' });
    expect(member.calls.map((c) => c.method)).toEqual(['session.login_with_password']);
    expect(master.calls[0]!.method).toBe('session.login_with_password');
    expect(master.calls.at(-1)!.method).toBe('session.logout');
    expectClean(master);
    expect(member.openSessions()).toBe(0);
  });
});

describe('TLS', () => {
  let dir: string;
  let certificate: Awaited<ReturnType<typeof makeTestCertificate>>;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'xapi-tls-'));
    certificate = await makeTestCertificate(dir);
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('rejects a self-signed certificate by default, naming the URL', async () => {
    const s = await standin({ tls: certificate });
    const error = await failure(register({ xapi: s.url, vm: s.vmUuid, env: env(s) }), s.password);
    expect(error).toMatchObject({ code: 'TLS' });
    expect(error.message).toBe(
      `cannot verify the TLS certificate of XAPI at ${s.url}: self-signed certificate ` +
        '(give its CA certificate with --xapi-ca FILE, or accept any certificate with --insecure)',
    );
    expect(s.calls).toEqual([]);
  });

  it('accepts it with the CA file', async () => {
    const s = await standin({ tls: certificate });
    await expect(register({ xapi: s.url, vm: s.vmUuid, env: env(s), ca: certificate.certFile })).resolves.toMatchObject({
      monitor: 'True',
    });
    expectClean(s);
  });

  it('accepts it when asked to be insecure', async () => {
    const s = await standin({ tls: certificate });
    await expect(register({ xapi: s.url, vm: s.vmUuid, env: env(s), insecure: true })).resolves.toMatchObject({
      monitor: 'True',
    });
    expectClean(s);
  });

  it('follows HOST_IS_SLAVE over https, verifying the master too', async () => {
    const pool = await startXapiPool({ tls: certificate });
    standins.push(pool);
    const result = await register({
      xapi: pool.member.url,
      vm: pool.master.vmUuid,
      env: env(pool.master),
      ca: certificate.certFile,
    });
    expect(result.xapi).toBe(pool.master.url);
    expectClean(pool.master);
  });

  it('says when the CA file cannot be used', async () => {
    const s = await standin({ tls: certificate });
    const missing = join(dir, 'missing.pem');
    await expect(register({ xapi: s.url, vm: s.vmUuid, env: env(s), ca: missing })).rejects.toBeInstanceOf(InputError);
    const junk = join(dir, 'junk.pem');
    await writeFile(junk, 'hello');
    await expect(register({ xapi: s.url, vm: s.vmUuid, env: env(s), ca: junk })).rejects.toThrow(
      `${junk}: not a PEM certificate file`,
    );
  });

  it('names the URL when https meets a plain http server', async () => {
    const s = await standin();
    const url = s.url.replace('http:', 'https:');
    const error = await failure(register({ xapi: url, vm: s.vmUuid, env: env(s) }), s.password);
    expect(error.message).toBe(`TLS with XAPI at ${url} failed: wrong version number`);
    expect(error).toBeInstanceOf(XapiError);
  });
});
