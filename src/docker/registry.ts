import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { Method, Response } from 'got';
import { CancelledError, InputError } from '../errors.js';
import { parseTag, sha256Digest } from './image.js';
import { Digester } from '../stream-sha256.js';

/**
 * A push client for the OCI distribution API (v2): blobs by monolithic or streamed upload, then a
 * manifest under a tag. Anonymous, Basic and Bearer-token (WWW-Authenticate challenge) auth;
 * credentials come from the caller (REGISTRY_USER / REGISTRY_PASSWORD), never from a reference.
 */

export interface PushRef {
  /** host[:port] as written in the reference (docker.io when none was). */
  registry: string;
  /** Repository path inside the registry, e.g. "ddk/xs65" or "library/ddk". */
  name: string;
  tag: string;
  /** registry/name:tag */
  ref: string;
}

export interface Credentials {
  username: string;
  password: string;
}

export interface RegistryOptions {
  /** HTTPS without certificate checks, else plain HTTP, as docker's insecure-registries. */
  insecure?: boolean;
  credentials?: Credentials;
}

/** Parse REGISTRY/REPO:TAG; a reference without a registry host means Docker Hub, as in docker. */
export function parsePushRef(ref: string): PushRef {
  const parsed = parseTag(ref);
  const full = parsed.fullName.slice(0, -(parsed.tag.length + 1));
  const slash = full.indexOf('/');
  const registry = full.slice(0, slash);
  const name = full.slice(slash + 1);
  return { registry, name, tag: parsed.tag, ref: `${registry}/${name}:${parsed.tag}` };
}

/** Docker talks plain HTTP to loopback registries without being told; so do we. */
export function isLoopback(registry: string): boolean {
  const host = registry.replace(/:\d+$/, '').replace(/^\[(.*)\]$/, '$1');
  return host === 'localhost' || host === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host);
}

/** Credentials from REGISTRY_USER / REGISTRY_PASSWORD: both or neither. */
export function credentialsFromEnv(env: Record<string, string | undefined> = process.env): Credentials | undefined {
  const username = env.REGISTRY_USER ?? '';
  const password = env.REGISTRY_PASSWORD ?? '';
  if (!username && !password) return undefined;
  if (!username || !password) throw new InputError(username ? 'REGISTRY_PASSWORD' : 'REGISTRY_USER', 'set both REGISTRY_USER and REGISTRY_PASSWORD, or neither for anonymous access');
  return { username, password };
}

/** `Bearer realm="…",service="…"` → scheme and parameters; quoted values may hold commas. */
export function parseChallenge(header: string): { scheme: string; params: Record<string, string> } {
  const m = /^\s*(\S+)\s*(.*)$/s.exec(header);
  const params: Record<string, string> = {};
  const re = /([\w-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?\s*/gy;
  let p: RegExpExecArray | null;
  const rest = m?.[2] ?? '';
  while ((p = re.exec(rest)) && p[0] !== '') params[p[1]!.toLowerCase()] = p[2] !== undefined ? p[2].replace(/\\(.)/g, '$1') : p[3]!;
  return { scheme: (m?.[1] ?? '').toLowerCase(), params };
}

/** The registry's own words: `{"errors":[{"code":"NAME_UNKNOWN","message":"…"}]}`. */
function describeStatus(res: Response<string>): string {
  let detail = '';
  try {
    const body = JSON.parse(res.body) as { errors?: { code?: string; message?: string }[] };
    detail = (body.errors ?? []).map((e) => [e.code, e.message].filter(Boolean).join(': ')).join('; ');
  } catch {
    detail = res.body.trim().split('\n')[0]!.slice(0, 200);
  }
  return `HTTP ${res.statusCode}${detail ? ` ${detail}` : ''}`;
}

const TLS_FAILURES = new Set(['EPROTO', 'ECONNRESET', 'ERR_SSL_WRONG_VERSION_NUMBER', 'ERR_SSL_PACKET_LENGTH_TOO_LONG']);

type Auth = { kind: 'anonymous' } | { kind: 'basic'; header: string } | { kind: 'bearer'; realm: string; service?: string; header?: string };

interface Send {
  headers?: Record<string, string>;
  body?: Buffer | Readable;
  /** Status codes that are answers, not errors. */
  ok: number[];
}

export class RegistryClient {
  private auth: Auth = { kind: 'anonymous' };
  /** Cancels every request; set to the running stage's signal. */
  signal: AbortSignal | undefined;

  private constructor(
    readonly ref: PushRef,
    /** https://host[:port] or http://host[:port] */
    readonly base: string,
    private readonly credentials: Credentials | undefined,
    /** Loopback or --push-insecure: HTTPS unverified, or HTTP. */
    private readonly insecure: boolean,
  ) {}

  /** What every error names. */
  get what(): string {
    return `registry ${this.ref.registry}`;
  }

  /** Reach the registry (/v2/), pick HTTPS or, where allowed, HTTP, and authenticate for push. */
  static async connect(ref: PushRef, opts: RegistryOptions, signal?: AbortSignal): Promise<RegistryClient> {
    const host = ref.registry === 'docker.io' ? 'registry-1.docker.io' : ref.registry;
    const insecure = opts.insecure === true || isLoopback(ref.registry);
    const client = new RegistryClient(ref, `https://${host}`, opts.credentials, insecure);
    client.signal = signal;
    let res: Response<string>;
    try {
      res = await client.raw('GET', `${client.base}/v2/`, {});
    } catch (err) {
      // An insecure registry that speaks plain HTTP answers a TLS hello with garbage or a reset.
      if (!insecure || !(err instanceof (await import('got')).RequestError) || !TLS_FAILURES.has(err.code)) throw client.failure(err);
      const plain = new RegistryClient(ref, `http://${host}`, opts.credentials, insecure);
      plain.signal = signal;
      return plain.authenticate(await plain.raw('GET', `${plain.base}/v2/`, {}).catch((e: unknown) => {
        throw plain.failure(e);
      }));
    }
    return client.authenticate(res);
  }

  private async authenticate(ping: Response<string>): Promise<this> {
    if (ping.statusCode === 200) return this;
    if (ping.statusCode !== 401) throw new InputError(this.what, `GET /v2/ answered ${describeStatus(ping)}: not an OCI distribution (v2) registry?`);
    const challenge = parseChallenge(String(ping.headers['www-authenticate'] ?? ''));
    const creds = this.credentials;
    if (challenge.scheme === 'basic') {
      if (!creds) throw new InputError(this.what, 'asks for credentials (Basic): set REGISTRY_USER and REGISTRY_PASSWORD');
      this.auth = { kind: 'basic', header: basic(creds) };
      const again = await this.request('GET', `${this.base}/v2/`, { ok: [200, 401] });
      if (again.statusCode === 401) throw new InputError(this.what, `rejected the credentials of user ${creds.username}`);
      return this;
    }
    if (challenge.scheme === 'bearer' && challenge.params.realm) {
      this.auth = { kind: 'bearer', realm: challenge.params.realm, ...(challenge.params.service ? { service: challenge.params.service } : {}) };
      await this.refreshToken();
      return this;
    }
    throw new InputError(this.what, `unsupported authentication challenge ${JSON.stringify(ping.headers['www-authenticate'] ?? '')}`);
  }

  /** A token for pull and push on the repository from the challenge's realm (RFC 6750, Docker token spec). */
  private async refreshToken(): Promise<void> {
    if (this.auth.kind !== 'bearer') return;
    const url = new URL(this.auth.realm, this.base);
    if (this.auth.service) url.searchParams.set('service', this.auth.service);
    url.searchParams.set('scope', `repository:${this.ref.name}:pull,push`);
    const creds = this.credentials;
    // Credentials go to a plain-HTTP token realm only where HTTP is allowed anyway.
    if (creds && url.protocol === 'http:' && !this.insecure && !isLoopback(url.host)) {
      throw new InputError(this.what, `token realm ${url.origin} is plain HTTP: refusing to send credentials (use --push-insecure to allow it)`);
    }
    let res: Response<string>;
    try {
      res = await this.raw('GET', url.href, { headers: creds ? { authorization: basic(creds) } : {} });
    } catch (err) {
      throw this.failure(err, `token service ${url.origin}`);
    }
    if (res.statusCode === 401 || res.statusCode === 403) {
      throw new InputError(this.what, creds ? `token service ${url.origin} rejected the credentials of user ${creds.username}` : `token service ${url.origin} refuses anonymous access: set REGISTRY_USER and REGISTRY_PASSWORD`);
    }
    if (res.statusCode !== 200) throw new InputError(this.what, `token service ${url.origin} answered ${describeStatus(res)}`);
    let token: unknown;
    try {
      const body = JSON.parse(res.body) as { token?: unknown; access_token?: unknown };
      token = body.token ?? body.access_token;
    } catch {
      token = undefined;
    }
    if (typeof token !== 'string' || !token) throw new InputError(this.what, `token service ${url.origin} sent no token`);
    this.auth.header = `Bearer ${token}`;
  }

  /** One HTTP exchange, no auth, no status handling; errors are got's. */
  private async raw(method: Method, url: string, send: Omit<Send, 'ok'>): Promise<Response<string>> {
    // Loaded when first needed: got (and dockerode) are most of the CLI's start-up time.
    const { default: got } = await import('got');
    return got(url, {
      method,
      headers: send.headers ?? {},
      ...(send.body ? { body: send.body } : {}),
      throwHttpErrors: false,
      followRedirect: method === 'GET' || method === 'HEAD',
      retry: { limit: 0 },
      // No overall limit: a layer upload takes as long as the conversion producing it.
      timeout: { lookup: 30_000, connect: 30_000, secureConnect: 30_000 },
      https: { rejectUnauthorized: !this.insecure },
      ...(this.signal ? { signal: this.signal } : {}),
    });
  }

  /**
   * A request with our credentials (only to the registry's own origin; an upload may be sent
   * elsewhere, e.g. to object storage). A Bearer token that expired during a long conversion
   * is fetched again once, for requests whose body can be sent again.
   */
  private async request(method: Method, url: string, send: Send): Promise<Response<string>> {
    const attempt = async () => {
      const headers = { ...send.headers };
      const header = this.auth.kind === 'anonymous' ? undefined : this.auth.header;
      if (header && new URL(url).origin === new URL(this.base).origin) headers.authorization = header;
      try {
        return await this.raw(method, url, { headers, ...(send.body ? { body: send.body } : {}) });
      } catch (err) {
        throw this.failure(err);
      }
    };
    let res = await attempt();
    const replayable = !(send.body && typeof (send.body as Readable).pipe === 'function');
    if (res.statusCode === 401 && this.auth.kind === 'bearer' && replayable && !send.ok.includes(401)) {
      await this.refreshToken();
      res = await attempt();
    }
    if (send.ok.includes(res.statusCode)) return res;
    const problem = `${method} ${new URL(url).pathname} answered ${describeStatus(res)}`;
    if (res.statusCode === 401 || res.statusCode === 403) {
      throw new InputError(this.what, `${problem}: not allowed to push to ${this.ref.name}${this.credentials ? ` as ${this.credentials.username}` : ' anonymously (set REGISTRY_USER and REGISTRY_PASSWORD)'}`);
    }
    throw new InputError(this.what, problem);
  }

  private failure(err: unknown, what = `cannot connect to ${this.base}`): Error {
    if (err instanceof InputError || err instanceof CancelledError) return err;
    if (this.signal?.aborted) return new CancelledError();
    const e = err as Error & { code?: string };
    return new InputError(this.what, `${what}: ${e.message}`, { cause: err });
  }

  private url(path: string): string {
    return `${this.base}/v2/${this.ref.name}/${path}`;
  }

  private location(res: Response<string>): URL {
    const location = res.headers.location;
    if (!location) throw new InputError(this.what, `${res.request.options.method} answered ${res.statusCode} without a Location`);
    return new URL(location, res.url);
  }

  async hasBlob(digest: string): Promise<boolean> {
    const res = await this.request('HEAD', this.url(`blobs/${digest}`), { ok: [200, 404] });
    return res.statusCode === 200;
  }

  private async startUpload(): Promise<URL> {
    return this.location(await this.request('POST', this.url('blobs/uploads/'), { ok: [202] }));
  }

  private async finishUpload(at: URL, digest: string, body?: Buffer): Promise<void> {
    at.searchParams.set('digest', digest);
    const res = await this.request('PUT', at.href, { ok: [201], headers: { 'content-type': 'application/octet-stream' }, ...(body ? { body } : {}) });
    const stored = res.headers['docker-content-digest'];
    if (stored && stored !== digest) throw new InputError(this.what, `stored blob ${digest} as ${String(stored)}`);
  }

  /** A small blob whose digest is known: skipped when present, else one monolithic PUT. */
  async pushBlob(data: Buffer): Promise<{ digest: string; size: number }> {
    const digest = sha256Digest(data);
    if (!(await this.hasBlob(digest))) await this.finishUpload(await this.startUpload(), digest, data);
    return { digest, size: data.length };
  }

  /**
   * A blob streamed in one PATCH, its digest computed on the way and given in the closing PUT,
   * where the registry checks it. A session cut short cannot be cancelled (distribution wants the
   * upload's current `_state`, which an interrupted PATCH never returns): the registry purges it.
   */
  async pushStream(body: Readable, onBytes?: (n: number) => void): Promise<{ digest: string; size: number }> {
    const session = await this.startUpload();
    const digester = new Digester((_total, added) => onBytes?.(added));
    const [res] = await Promise.all([
      this.request('PATCH', session.href, { ok: [202], headers: { 'content-type': 'application/octet-stream' }, body: digester }),
      pipeline(body, digester).catch((err: unknown) => {
        digester.destroy(err as Error);
        throw err;
      }),
    ]);
    const digest = digester.digest();
    await this.finishUpload(this.location(res), digest);
    return { digest, size: digester.bytes };
  }

  /** PUT the manifest under the tag: from this moment the tag is visible. Returns its digest. */
  async putManifest(bytes: Buffer, mediaType: string): Promise<string> {
    const digest = sha256Digest(bytes);
    const res = await this.request('PUT', this.url(`manifests/${this.ref.tag}`), { ok: [201], headers: { 'content-type': mediaType }, body: bytes });
    const stored = res.headers['docker-content-digest'];
    if (stored && stored !== digest) throw new InputError(this.what, `stored manifest ${digest} as ${String(stored)}`);
    return digest;
  }
}

function basic(c: Credentials): string {
  return `Basic ${Buffer.from(`${c.username}:${c.password}`).toString('base64')}`;
}
