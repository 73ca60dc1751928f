import { setTimeout as sleep } from 'node:timers/promises';
import { XMLParser } from 'fast-xml-parser';
import { CancelledError } from '../errors.js';
import { displayUrl, XapiError } from './rpc.js';
import { parseXapiUrl, type XapiConnectOptions, type XapiSession, withXapiSession } from './session.js';

/** XAPI plus the VM whose Docker xscontainer watches. */
export interface XapiVmOptions extends XapiConnectOptions {
  /** The VM's uuid. */
  vm: string;
}

export interface RegistrationResult {
  vm: string;
  /** The pool master that answered (the given URL, or the master it pointed to). */
  xapi: string;
  /** `other_config['xscontainer-monitor']` as read back after the call. */
  monitor: 'True' | 'False';
}

/** One container as xscontainer's monitor reports it in `other_config['docker_ps']`. */
export interface MonitoredContainer {
  id: string;
  /** The image as the container was created from it: a name[:tag] or an image id. */
  image: string;
  /** `sha256:…` (empty when Docker did not report it). */
  imageId: string;
  command: string;
  /** Seconds since the epoch. */
  created: number;
  /** Docker's status, shortened by xscontainer to "Up", "Up (Paused)" or "Exited (N)". */
  status: string;
  /** "running", "exited", … (empty with Docker releases older than 1.13). */
  state: string;
  /** The container's name, without Docker's leading slash. */
  names: string;
}

export interface WaitMonitoringOptions extends XapiVmOptions {
  /** Image ids (`sha256:…` or a hex prefix of 12+ digits) and/or names[:tag]; any may match. */
  image: string | readonly string[];
  timeoutSeconds: number;
  /** Seconds between two reads of other_config (default 1). */
  intervalSeconds?: number;
}

export interface WaitMonitoringResult {
  vm: string;
  xapi: string;
  container: MonitoredContainer;
  seconds: number;
}

export const CONTAINER_ACTIONS = ['start', 'stop', 'restart', 'pause', 'unpause'] as const;
export type ContainerAction = (typeof CONTAINER_ACTIONS)[number];

export interface ContainerActionOptions extends XapiVmOptions {
  /** A container id or name. */
  container: string;
}

export interface ContainerActionResult {
  vm: string;
  xapi: string;
  container: string;
  action: ContainerAction;
  /** What the plugin returned after its "True" (Docker's reply body, usually empty). */
  output: string;
}

const PLUGIN = 'xscontainer';
const MONITOR_KEY = 'xscontainer-monitor';
const DOCKER_KEYS = ['docker_ps', 'docker_info', 'docker_version'] as const;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
// The names xscontainer itself accepts for a container; anything else it refuses with an exception.
const CONTAINER = /^[a-z0-9_.-]+$/;

/** Checks the URL (never echoing credentials in it) and the VM uuid; returns the URL to show. */
function checkVm(options: XapiVmOptions): string {
  const where = displayUrl(parseXapiUrl(options.xapi));
  if (!UUID.test(options.vm)) throw new XapiError('INVALID_ARGUMENT', where, `${options.vm}: not a VM uuid`);
  return where;
}

async function vmRef(session: XapiSession, uuid: string): Promise<string> {
  const ref = await session.call('VM.get_by_uuid', uuid);
  if (typeof ref !== 'string') {
    throw new XapiError('PROTOCOL', session.url, `XAPI at ${session.url} returned no reference for VM ${uuid}`);
  }
  return ref;
}

async function otherConfig(session: XapiSession, ref: string): Promise<Record<string, string>> {
  const config = await session.call('VM.get_other_config', ref);
  if (typeof config !== 'object' || config === null || Array.isArray(config)) {
    throw new XapiError('PROTOCOL', session.url, `XAPI at ${session.url} returned no other_config map`);
  }
  return Object.fromEntries(Object.entries(config).map(([k, v]) => [k, String(v)]));
}

/** Calls an xscontainer function and insists on its "True…" success prefix; returns the rest. */
async function callXscontainer(session: XapiSession, fn: string, args: Record<string, string>): Promise<string> {
  const result = await session.callPlugin(PLUGIN, fn, args);
  if (!result.startsWith('True')) {
    throw new XapiError(
      'UNEXPECTED_RESULT',
      session.url,
      `xscontainer ${fn} on XAPI at ${session.url} did not report success: ${JSON.stringify(result.slice(0, 200))}`,
    );
  }
  return result.slice('True'.length);
}

async function setRegistration(options: XapiVmOptions, fn: 'register' | 'deregister'): Promise<RegistrationResult> {
  checkVm(options);
  return withXapiSession(options, async (session) => {
    const ref = await vmRef(session, options.vm);
    await callXscontainer(session, fn, { vmuuid: options.vm });
    const config = await otherConfig(session, ref);
    const want = fn === 'register' ? 'True' : 'False';
    const have = config[MONITOR_KEY];
    if (have !== want) {
      throw new XapiError(
        'UNEXPECTED_RESULT',
        session.url,
        `xscontainer ${fn} reported success, but VM ${options.vm} has other_config ${MONITOR_KEY}=` +
          `${have === undefined ? '(absent)' : JSON.stringify(have)} instead of ${want}`,
      );
    }
    if (fn === 'deregister') {
      const left = DOCKER_KEYS.filter((key) => key in config);
      if (left.length > 0) {
        throw new XapiError(
          'UNEXPECTED_RESULT',
          session.url,
          `xscontainer deregister reported success, but VM ${options.vm} still has other_config ${left.join(', ')}`,
        );
      }
    }
    return { vm: options.vm, xapi: session.url, monitor: want };
  });
}

/** Asks xscontainer to monitor the VM's Docker, then confirms other_config says so. */
export function register(options: XapiVmOptions): Promise<RegistrationResult> {
  return setRegistration(options, 'register');
}

/** Stops xscontainer monitoring the VM, then confirms its docker_* keys are gone. */
export function deregister(options: XapiVmOptions): Promise<RegistrationResult> {
  return setRegistration(options, 'deregister');
}

// xscontainer escapes text itself before minidom escapes it again, so after XML decoding these
// three entities are still left in every value.
function undoSaxEscape(text: string): string {
  return text.replace(/&lt;/g, '<').replace(/&gt;/g, '>').replace(/&amp;/g, '&');
}

const psParser = new XMLParser({
  ignoreAttributes: true,
  ignoreDeclaration: true,
  parseTagValue: false,
  trimValues: false,
  htmlEntities: false,
  isArray: (_name, jpath) => jpath === 'docker_ps.item',
});

function text(entry: Record<string, unknown>, key: string): string {
  const value = entry[key];
  return typeof value === 'string' ? undoSaxEscape(value) : '';
}

/**
 * Parses `other_config['docker_ps']` as xscontainer writes it: the JSON of Docker's
 * `GET /containers/json?all=1&size=1`, top-level keys lower-cased, `Names` cut to the first name,
 * turned into `<docker_ps><item><entry><id>…</id><image>…</image>…</entry></item>…</docker_ps>`.
 */
export function parseDockerPs(xml: string, source = 'docker_ps'): MonitoredContainer[] {
  let document: unknown;
  try {
    document = psParser.parse(xml, true);
  } catch (error) {
    throw new XapiError('PROTOCOL', source, `${source} is not well-formed XML: ${(error as Error).message}`);
  }
  const root = (document as Record<string, unknown>).docker_ps;
  if (root === undefined) {
    throw new XapiError('PROTOCOL', source, `${source} is not xscontainer's docker_ps document`);
  }
  const items = typeof root === 'object' && root !== null ? (root as Record<string, unknown>).item : undefined;
  if (!Array.isArray(items)) return [];
  return items.flatMap((item: unknown) => {
    const entry = (item as Record<string, unknown> | null)?.entry;
    if (typeof entry !== 'object' || entry === null) return [];
    const e = entry as Record<string, unknown>;
    const created = Number(text(e, 'created'));
    return [
      {
        id: text(e, 'id'),
        image: text(e, 'image'),
        imageId: text(e, 'imageid'),
        command: text(e, 'command'),
        created: Number.isFinite(created) ? created : 0,
        status: text(e, 'status'),
        state: text(e, 'state'),
        names: text(e, 'names'),
      },
    ];
  });
}

const IMAGE_ID = /^(?:sha256:)?([0-9a-f]{12,64})$/;

function normalisedName(reference: string): string {
  const tagged = /:[^/]+$/.test(reference) || reference.includes('@') ? reference : `${reference}:latest`;
  return tagged.replace(/^docker\.io\//, '').replace(/^library\//, '');
}

/** Whether the container was created from one of the images (by id prefix or by name). */
export function fromImage(container: MonitoredContainer, images: readonly string[]): boolean {
  return images.some((reference) => {
    const id = IMAGE_ID.exec(reference)?.[1];
    if (id !== undefined) {
      return [container.imageId, container.image].some((candidate) => {
        const hex = IMAGE_ID.exec(candidate)?.[1];
        return hex !== undefined && (hex.startsWith(id) || id.startsWith(hex));
      });
    }
    return container.image !== '' && normalisedName(container.image) === normalisedName(reference);
  });
}

function readDockerPs(config: Record<string, string>, vm: string): MonitoredContainer[] | undefined {
  const xml = config.docker_ps;
  return xml === undefined ? undefined : parseDockerPs(xml, `docker_ps of VM ${vm}`);
}

function notMonitored(session: XapiSession, vm: string, config: Record<string, string>): XapiError {
  const flag = config[MONITOR_KEY];
  return new XapiError(
    'NOT_REGISTERED',
    session.url,
    `VM ${vm} is not registered for container monitoring (other_config ${MONITOR_KEY} is ` +
      `${flag === undefined ? 'absent' : flag}): register it first`,
  );
}

/** The containers xscontainer's monitor last reported for the VM. */
export async function listContainers(options: XapiVmOptions): Promise<MonitoredContainer[]> {
  checkVm(options);
  return withXapiSession(options, async (session) => {
    const config = await otherConfig(session, await vmRef(session, options.vm));
    const containers = readDockerPs(config, options.vm);
    if (containers !== undefined) return containers;
    if (config[MONITOR_KEY] !== 'True') throw notMonitored(session, options.vm, config);
    throw new XapiError(
      'NOT_MONITORED_YET',
      session.url,
      `VM ${options.vm} is registered, but xscontainer's monitor has not reported its containers yet ` +
        '(the VM must run, be prepared with xscontainer-prepare-vm and run Docker)',
    );
  });
}

/**
 * Polls the VM's other_config until docker_ps lists a container created from one of the images;
 * fails with a clear message when `timeoutSeconds` pass first.
 */
export async function waitMonitoring(options: WaitMonitoringOptions): Promise<WaitMonitoringResult> {
  const where = checkVm(options);
  const images = typeof options.image === 'string' ? [options.image] : [...options.image];
  if (images.length === 0) {
    throw new XapiError('INVALID_ARGUMENT', where, 'waitMonitoring needs at least one image id or name');
  }
  const started = Date.now();
  const deadline = started + options.timeoutSeconds * 1000;
  const intervalMs = (options.intervalSeconds ?? 1) * 1000;
  return withXapiSession(options, async (session) => {
    const ref = await vmRef(session, options.vm);
    let seen: MonitoredContainer[] | undefined;
    while (true) {
      const config = await otherConfig(session, ref);
      if (config[MONITOR_KEY] !== 'True') throw notMonitored(session, options.vm, config);
      seen = readDockerPs(config, options.vm);
      const matches = seen?.filter((container) => fromImage(container, images)) ?? [];
      const left = deadline - Date.now();
      // `docker run` creates, then starts: a container caught in between is reported once it has
      // started, unless time runs out (then it is what there is, e.g. one only `docker create`d).
      const match = matches.find((container) => container.state !== 'created') ?? (left <= 0 ? matches[0] : undefined);
      if (match !== undefined) {
        return { vm: options.vm, xapi: session.url, container: match, seconds: (Date.now() - started) / 1000 };
      }
      if (left <= 0) break;
      try {
        await sleep(Math.min(intervalMs, left), undefined, { signal: options.signal });
      } catch {
        throw new CancelledError();
      }
    }
    const detail =
      seen === undefined
        ? "xscontainer's monitor has not reported the VM's containers at all: check that the VM runs, " +
          'was prepared with xscontainer-prepare-vm and runs Docker'
        : `docker_ps lists ${seen.length} container(s)` +
          (seen.length > 0 ? `, from ${[...new Set(seen.map((c) => c.image))].join(', ')}` : '');
    throw new XapiError(
      'MONITOR_TIMEOUT',
      session.url,
      `no container from image ${images.join(' or ')} appeared in docker_ps of VM ${options.vm} ` +
        `within ${options.timeoutSeconds} s; ${detail}`,
    );
  });
}

/** start/stop/restart/pause/unpause a container in the VM through xscontainer. */
export async function containerAction(action: ContainerAction, options: ContainerActionOptions): Promise<ContainerActionResult> {
  const where = checkVm(options);
  if (!(CONTAINER_ACTIONS as readonly string[]).includes(action)) {
    throw new XapiError(
      'INVALID_ARGUMENT',
      where,
      `${String(action)}: not a container action (${CONTAINER_ACTIONS.join(', ')})`,
    );
  }
  if (!CONTAINER.test(options.container)) {
    throw new XapiError(
      'INVALID_ARGUMENT',
      where,
      `${options.container}: not a container id or name xscontainer accepts (a-z, 0-9, _ . -)`,
    );
  }
  return withXapiSession(options, async (session) => {
    await vmRef(session, options.vm);
    const output = await callXscontainer(session, action, { vmuuid: options.vm, container: options.container });
    return { vm: options.vm, xapi: session.url, container: options.container, action, output };
  });
}
