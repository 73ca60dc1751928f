/**
 * A XAPI stand-in for tests: an HTTP(S) server on loopback that speaks XAPI's XML-RPC wire format
 * (parsed and written with Xen Orchestra's XML-RPC codec, as a real client would see it) and
 * implements the calls ddk2docker makes, plus the xscontainer plugin with its semantics and a
 * monitor that fills docker_ps / docker_info / docker_version from a real dockerd.
 */
import http from 'node:http';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import { randomUUID } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import Docker from 'dockerode';
import { execa } from 'execa';
import { formatXml, type XmlNode } from '@vates/xml/format';
import { parseXml } from '@vates/xml/parse';
import { xmlRpcFormatter } from '@vates/xml-rpc/formatter';
import { xmlRpcParser } from '@vates/xml-rpc/parser';

export interface RecordedCall {
  method: string;
  params: unknown[];
  path: string;
  headers: http.IncomingHttpHeaders;
  /** The raw request body, so tests can search it for what must not be there. */
  body: string;
}

export interface StandinVm {
  uuid: string;
  ref: string;
  name: string;
  /** Live: tests may read or seed keys (e.g. a docker_ps fixture). */
  otherConfig: Record<string, string>;
}

export interface XapiStandinOptions {
  user?: string;
  password?: string;
  /** Serve https with this certificate; http otherwise. */
  tls?: { cert: string; key: string };
  address?: string;
  port?: number;
  /** Act as a pool member: every login answers HOST_IS_SLAVE naming this master address. */
  masterAddress?: string;
  /** Whether the xscontainer plugin is installed (default true). */
  plugin?: boolean;
  /** The xscontainer functions offered (default all); others give UNKNOWN_XENAPI_PLUGIN_FUNCTION. */
  functions?: readonly string[];
  /** DOCKER_HOST of the dockerd standing in for the VM's Docker (unix:///… or tcp://…). */
  dockerHost?: string;
  /** VM uuids (default one random VM). */
  vms?: readonly string[];
  monitorIntervalMs?: number;
}

export interface XapiStandin {
  url: string;
  address: string;
  port: number;
  user: string;
  password: string;
  calls: RecordedCall[];
  vms: Map<string, StandinVm>;
  /** The first VM's uuid. */
  vmUuid: string;
  /** Sessions logged in and not yet logged out. */
  openSessions(): number;
  close(): Promise<void>;
}

class Failure extends Error {
  readonly description: string[];
  constructor(...description: string[]) {
    super(description.join(' '));
    this.description = description;
  }
}

// What XenAPIPlugin.dispatch turns an uncaught plugin exception into.
class PluginException extends Error {
  readonly kind: string;
  constructor(kind: string, message: string) {
    super(message);
    this.kind = kind;
  }
}

const ALL_FUNCTIONS = [
  'register',
  'deregister',
  'start',
  'stop',
  'restart',
  'pause',
  'unpause',
  'get_inspect',
  'get_top',
] as const;

// Python's str() of JSON scalars, as xscontainer's converttoxml writes them.
function pythonText(value: unknown): string {
  if (value === null || value === undefined) return 'None';
  if (value === true) return 'True';
  if (value === false) return 'False';
  return String(value);
}

// xml.sax.saxutils.escape: xscontainer applies it before minidom escapes once more.
function saxEscape(text: string): string {
  return text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

function xmlChildren(value: unknown): (XmlNode | string)[] {
  if (Array.isArray(value)) return value.map((item) => ({ name: 'item', children: xmlChildren(item) }));
  if (typeof value === 'object' && value !== null) {
    return Object.entries(value).map(([key, inner]) => {
      // Names XML forbids go into a wrapper element that carries the key as an attribute.
      const special = /^[0-9.:!?]/.test(key) || key.includes('/') || key.toLowerCase().startsWith('xml');
      return special
        ? { name: 'SPECIAL_XS_ENCODED_ELEMENT', attributes: { name: key }, children: xmlChildren(inner) }
        : { name: saxEscape(key), children: xmlChildren(inner) };
    });
  }
  return [saxEscape(pythonText(value))];
}

/** xscontainer's util.converttoxml({root: value}). */
export function xscontainerXml(root: string, value: unknown): string {
  return formatXml({ name: root, children: xmlChildren(value) }, { indent: 0 });
}

/** The docker_ps document xscontainer writes for the JSON of GET /containers/json?all=1&size=1. */
export function dockerPsXml(containers: readonly Record<string, unknown>[]): string {
  const entries = containers.map((container) => {
    const patched: Record<string, unknown> = { ...container };
    const names = container.Names;
    patched.Names = Array.isArray(names) && typeof names[0] === 'string' ? names[0].slice(1) : names;
    patched.Container = String(container.Id).slice(0, 10);
    const status = String(container.Status ?? '');
    if (status.startsWith('Up')) patched.Status = status.endsWith('(Paused)') ? 'Up (Paused)' : 'Up';
    else if (status.startsWith('Exited (')) patched.Status = status.slice(0, status.lastIndexOf(')') + 1);
    return { entry: Object.fromEntries(Object.entries(patched).map(([k, v]) => [k.toLowerCase(), v])) };
  });
  return xscontainerXml('docker_ps', entries);
}

function dockerClient(host: string): Docker {
  if (host.startsWith('unix://')) return new Docker({ socketPath: host.slice('unix://'.length) });
  const url = new URL(host.replace(/^tcp:/, 'http:'));
  return new Docker({ host: url.hostname, port: Number(url.port) });
}

/** A self-signed certificate for 127.0.0.1, 127.0.0.2 and localhost, made by openssl. */
export async function makeTestCertificate(dir: string): Promise<{ cert: string; key: string; certFile: string }> {
  const certFile = join(dir, 'xapi-cert.pem');
  const keyFile = join(dir, 'xapi-key.pem');
  await execa('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', keyFile, '-out', certFile, '-days', '2', '-subj', '/CN=xapi-standin',
    '-addext', 'subjectAltName=IP:127.0.0.1,IP:127.0.0.2,DNS:localhost',
  ]);
  return { cert: await readFile(certFile, 'utf8'), key: await readFile(keyFile, 'utf8'), certFile };
}

export async function startXapiStandin(options: XapiStandinOptions = {}): Promise<XapiStandin> {
  const user = options.user ?? 'root';
  const password = options.password ?? 'standin-secret';
  const functions = new Set<string>(options.functions ?? ALL_FUNCTIONS);
  const pluginInstalled = options.plugin ?? true;
  const monitorIntervalMs = options.monitorIntervalMs ?? 1000;
  const docker = options.dockerHost === undefined ? undefined : dockerClient(options.dockerHost);
  const poolRef = `OpaqueRef:${randomUUID()}`;
  const hostRef = `OpaqueRef:${randomUUID()}`;
  const sessions = new Set<string>();
  const calls: RecordedCall[] = [];
  const vms = new Map<string, StandinVm>();
  for (const uuid of options.vms ?? [randomUUID()]) {
    vms.set(uuid, { uuid, ref: `OpaqueRef:${randomUUID()}`, name: `vm-${uuid.slice(0, 8)}`, otherConfig: {} });
  }
  const byRef = (ref: unknown): StandinVm => {
    for (const vm of vms.values()) if (vm.ref === ref) return vm;
    throw new Failure('HANDLE_INVALID', 'VM', String(ref));
  };

  // The monitor: one loop per registered VM, stopped by bumping its generation.
  const generations = new Map<string, number>();
  const timers = new Set<NodeJS.Timeout>();
  const running = new Set<Promise<void>>();
  let closed = false;
  const monitoring = (vm: StandinVm, generation: number): boolean =>
    !closed && generations.get(vm.uuid) === generation && vm.otherConfig['xscontainer-monitor'] === 'True';

  const writeDockerPs = async (vm: StandinVm, generation: number): Promise<void> => {
    if (docker === undefined) return;
    const ps = await docker.listContainers({ all: true, size: true });
    if (monitoring(vm, generation)) vm.otherConfig.docker_ps = dockerPsXml(ps as unknown as Record<string, unknown>[]);
  };
  const tick = async (vm: StandinVm, generation: number): Promise<void> => {
    if (docker === undefined) return;
    try {
      const info = await docker.info();
      const version = await docker.version();
      if (!monitoring(vm, generation)) return;
      vm.otherConfig.docker_info = xscontainerXml('docker_info', info);
      vm.otherConfig.docker_version = xscontainerXml('docker_version', version);
      await writeDockerPs(vm, generation);
    } catch {
      // Like xscontainer: a Docker that cannot be reached leaves the keys as they are; retry later.
    }
  };
  const schedule = (vm: StandinVm, generation: number): void => {
    if (!monitoring(vm, generation)) return;
    const timer = setTimeout(() => {
      timers.delete(timer);
      const run = tick(vm, generation).finally(() => {
        running.delete(run);
        schedule(vm, generation);
      });
      running.add(run);
    }, monitorIntervalMs);
    timers.add(timer);
  };
  const startMonitor = (vm: StandinVm): void => {
    const generation = (generations.get(vm.uuid) ?? 0) + 1;
    generations.set(vm.uuid, generation);
    const run = tick(vm, generation).finally(() => {
      running.delete(run);
      schedule(vm, generation);
    });
    running.add(run);
  };
  const stopMonitor = (vm: StandinVm): void => {
    generations.set(vm.uuid, (generations.get(vm.uuid) ?? 0) + 1);
  };

  const pluginVm = (args: Record<string, unknown>, required: string[]): StandinVm => {
    for (const key of required) {
      if (typeof args[key] !== 'string') throw new PluginException('Exception', 'INVALID_ARGUMENTS');
    }
    const vm = vms.get(String(args.vmuuid));
    if (vm === undefined) throw new PluginException('Failure', `['UUID_INVALID', 'VM', '${String(args.vmuuid)}']`);
    return vm;
  };
  const pluginContainer = (args: Record<string, unknown>): { vm: StandinVm; id: string; docker: Docker } => {
    const vm = pluginVm(args, ['vmuuid', 'container']);
    const id = String(args.container);
    if (!/^[a-z0-9_.-]+$/.test(id)) throw new PluginException('XSContainerException', 'Invalid container');
    if (docker === undefined) {
      throw new PluginException(
        'XSContainerException',
        'Unable to find the Docker unix socket at /var/run/docker.sock. Please install and run Docker.',
      );
    }
    return { vm, id, docker };
  };
  // Docker's refusal, worded as xscontainer's _interact_with_api words it (CRLFs included).
  const dockerFailure = (request: string, error: unknown): PluginException => {
    const e = error as { statusCode?: number; json?: { message?: string } | null };
    const status = e.statusCode ?? 500;
    let body = e.json?.message ?? '';
    if (body === '') {
      body =
        status === 304
          ? 'The requested operation is currently not possible. Please try again later.'
          : 'The requested operation failed.';
    }
    return new PluginException(
      'XSContainerException',
      `Request '${request} HTTP/1.0\r\n\r\n' led to status ${http.STATUS_CODES[status] ?? status} - ` +
        `Container Management Error: ${body} (${status})`,
    );
  };
  const plugin: Record<string, (args: Record<string, unknown>) => Promise<string>> = {
    async register(args) {
      const vm = pluginVm(args, ['vmuuid']);
      vm.otherConfig['xscontainer-monitor'] = 'True';
      startMonitor(vm);
      return 'TrueNone';
    },
    async deregister(args) {
      const vm = pluginVm(args, ['vmuuid']);
      stopMonitor(vm);
      vm.otherConfig['xscontainer-monitor'] = 'False';
      for (const key of ['docker_ps', 'docker_info', 'docker_version']) delete vm.otherConfig[key];
      return 'TrueNone';
    },
    async get_inspect(args) {
      const vm = pluginVm(args, ['vmuuid', 'object']);
      const { docker: d } = pluginContainer({ vmuuid: vm.uuid, container: args.object });
      const id = String(args.object);
      try {
        return `True${xscontainerXml('docker_inspect', await d.getContainer(id).inspect())}`;
      } catch (error) {
        throw dockerFailure(`GET /containers/${id}/json`, error);
      }
    },
    async get_top(args) {
      const vm = pluginVm(args, ['vmuuid', 'object']);
      const { docker: d } = pluginContainer({ vmuuid: vm.uuid, container: args.object });
      const id = String(args.object);
      let top: { Titles: string[]; Processes: string[][] };
      try {
        top = (await d.getContainer(id).top()) as { Titles: string[]; Processes: string[][] };
      } catch (error) {
        throw dockerFailure(`GET /containers/${id}/top`, error);
      }
      const processes = top.Processes.map((process) => ({
        Process: Object.fromEntries(top.Titles.map((title, i) => [title, process[i]])),
      }));
      return `True${xscontainerXml('docker_top', processes)}`;
    },
  };
  for (const action of ['start', 'stop', 'restart', 'pause', 'unpause'] as const) {
    plugin[action] = async (args) => {
      const { vm, id, docker: d } = pluginContainer(args);
      const container = d.getContainer(id);
      const run = {
        start: () => container.start(),
        stop: () => container.stop(),
        restart: () => container.restart(),
        pause: () => container.pause(),
        unpause: () => container.unpause(),
      }[action];
      try {
        await run();
      } catch (error) {
        throw dockerFailure(`POST /containers/${id}/${action}`, error);
      }
      // xscontainer refreshes docker_ps itself after pause/unpause: older Dockers sent no event.
      const generation = generations.get(vm.uuid);
      if ((action === 'pause' || action === 'unpause') && 'docker_ps' in vm.otherConfig && generation !== undefined) {
        await writeDockerPs(vm, generation).catch(() => undefined);
      }
      return 'True';
    };
  }

  const vmRecord = (vm: StandinVm): Record<string, unknown> => ({
    uuid: vm.uuid,
    name_label: vm.name,
    power_state: 'Running',
    is_a_template: false,
    is_control_domain: false,
    resident_on: hostRef,
    other_config: { ...vm.otherConfig },
  });

  const methods: Record<string, (params: unknown[]) => Promise<unknown>> = {
    async 'session.login_with_password'([name, secret]) {
      if (options.masterAddress !== undefined) throw new Failure('HOST_IS_SLAVE', options.masterAddress);
      if (name !== user || secret !== password) {
        throw new Failure('SESSION_AUTHENTICATION_FAILED', String(name), 'Authentication failure');
      }
      const ref = `OpaqueRef:${randomUUID()}`;
      sessions.add(ref);
      return ref;
    },
    async 'session.logout'([session]) {
      sessions.delete(String(session));
      return '';
    },
    async 'pool.get_all'() {
      return [poolRef];
    },
    async 'pool.get_master'([, pool]) {
      if (pool !== poolRef) throw new Failure('HANDLE_INVALID', 'pool', String(pool));
      return hostRef;
    },
    async 'host.get_all'() {
      return [hostRef];
    },
    async 'VM.get_by_uuid'([, uuid]) {
      const vm = vms.get(String(uuid));
      if (vm === undefined) throw new Failure('UUID_INVALID', 'VM', String(uuid));
      return vm.ref;
    },
    async 'VM.get_other_config'([, ref]) {
      return { ...byRef(ref).otherConfig };
    },
    async 'VM.get_record'([, ref]) {
      return vmRecord(byRef(ref));
    },
    async 'host.call_plugin'([, host, name, fn, args]) {
      if (host !== hostRef) throw new Failure('HANDLE_INVALID', 'host', String(host));
      if (!pluginInstalled || name !== 'xscontainer') throw new Failure('XENAPI_MISSING_PLUGIN', String(name));
      const handler = plugin[String(fn)];
      if (handler === undefined || !functions.has(String(fn))) {
        throw new Failure('UNKNOWN_XENAPI_PLUGIN_FUNCTION', String(fn));
      }
      const map = typeof args === 'object' && args !== null ? (args as Record<string, unknown>) : {};
      try {
        return await handler(map);
      } catch (error) {
        if (error instanceof PluginException) {
          throw new Failure('XENAPI_PLUGIN_FAILURE', String(fn), error.kind, error.message);
        }
        throw error;
      }
    },
  };

  const dispatch = async (method: string, params: unknown[]): Promise<unknown> => {
    const handler = methods[method];
    if (handler === undefined) throw new Failure('MESSAGE_METHOD_UNKNOWN', method);
    if (method !== 'session.login_with_password' && !sessions.has(String(params[0]))) {
      throw new Failure('SESSION_INVALID', String(params[0]));
    }
    return handler(params);
  };

  const handle = (request: http.IncomingMessage, response: http.ServerResponse): void => {
    const chunks: Buffer[] = [];
    request.on('data', (chunk: Buffer) => chunks.push(chunk));
    request.on('end', () => {
      const body = Buffer.concat(chunks).toString('utf8');
      const reply = (status: number, payload: unknown): void => {
        const xml = formatXml(xmlRpcFormatter.format_methodResponse({ params: [payload] }), { indent: 0 });
        response.writeHead(status, { 'content-type': 'text/xml' }).end(xml);
      };
      let call: { methodName: string; params: unknown[] };
      try {
        if (request.method !== 'POST') throw new Error(`${request.method ?? '?'} is not POST`);
        call = xmlRpcParser.parse(parseXml(body, { normalize: false, trim: false })) as typeof call;
      } catch (error) {
        response.writeHead(400, { 'content-type': 'text/plain' }).end(String(error));
        return;
      }
      calls.push({ method: call.methodName, params: call.params, path: request.url ?? '', headers: request.headers, body });
      dispatch(call.methodName, call.params).then(
        (value) => reply(200, { Status: 'Success', Value: value }),
        (error: unknown) =>
          reply(200, {
            Status: 'Failure',
            ErrorDescription: error instanceof Failure ? error.description : ['INTERNAL_ERROR', String(error)],
          }),
      );
    });
  };

  const server = options.tls === undefined ? http.createServer(handle) : https.createServer(options.tls, handle);
  const address = options.address ?? '127.0.0.1';
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.port ?? 0, address, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const { port } = server.address() as AddressInfo;
  const [first] = vms.keys();
  return {
    url: `${options.tls === undefined ? 'http' : 'https'}://${address}:${port}`,
    address,
    port,
    user,
    password,
    calls,
    vms,
    vmUuid: first ?? '',
    openSessions: () => sessions.size,
    async close() {
      closed = true;
      for (const timer of timers) clearTimeout(timer);
      timers.clear();
      await Promise.allSettled([...running]);
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/**
 * A pool of two stand-ins on one port: the master on 127.0.0.2 and a member on 127.0.0.1 that
 * answers every login with HOST_IS_SLAVE, as XAPI names a master by address alone.
 */
export async function startXapiPool(
  options: Omit<XapiStandinOptions, 'address' | 'port' | 'masterAddress'> = {},
): Promise<{ master: XapiStandin; member: XapiStandin; close(): Promise<void> }> {
  for (let attempt = 0; ; attempt++) {
    const master = await startXapiStandin({ ...options, address: '127.0.0.2' });
    try {
      const member = await startXapiStandin({
        ...options,
        address: '127.0.0.1',
        port: master.port,
        masterAddress: master.address,
        dockerHost: undefined,
      });
      return {
        master,
        member,
        close: async () => {
          await member.close();
          await master.close();
        },
      };
    } catch (error) {
      await master.close();
      if ((error as NodeJS.ErrnoException).code !== 'EADDRINUSE' || attempt >= 5) throw error;
    }
  }
}
