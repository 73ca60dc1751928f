import http from 'node:http';
import https from 'node:https';
import { readFile } from 'node:fs/promises';
import { rootCertificates } from 'node:tls';
import { CancelledError, InputError, throwIfAborted } from '../errors.js';
import { displayUrl, oneLine, type RpcEndpoint, XapiError, xmlRpcCall } from './rpc.js';

/** How to reach XAPI. Credentials are never an option: they come from XAPI_USER / XAPI_PASSWORD. */
export interface XapiConnectOptions {
  /** http(s) URL of any host of the pool (a bare host name means https). */
  xapi: string;
  /** Accept any TLS certificate. Only when the user asks for it. */
  insecure?: boolean;
  /** A PEM file of CA certificates trusted in addition to the system ones (e.g. the hosts' own). */
  ca?: string;
  signal?: AbortSignal;
  /** Where XAPI_USER and XAPI_PASSWORD are read from; process.env by default. */
  env?: NodeJS.ProcessEnv;
  /** Seconds one call may take before the host counts as unreachable (default 60). */
  callTimeoutSeconds?: number;
}

/** A logged-in session on the pool master. */
export interface XapiSession {
  /** The master's URL, as shown to users (differs from the given one after HOST_IS_SLAVE). */
  readonly url: string;
  readonly user: string;
  /** Calls `method(session, ...args)`; known XAPI failures become one-line XapiErrors. */
  call(method: string, ...args: unknown[]): Promise<unknown>;
  /** The pool master's host reference: plugins are called there. */
  master(): Promise<string>;
  /** `host.call_plugin` on the master; resolves to the plugin's result string. */
  callPlugin(plugin: string, fn: string, args: Record<string, string>): Promise<string>;
}

const LOGOUT_TIMEOUT_MS = 10_000;
const ORIGINATOR = 'ddk2docker';

/** Parses the user's XAPI URL; refuses credentials in it, as they would have come from argv. */
export function parseXapiUrl(text: string): URL {
  const withScheme = /^[a-z][a-z0-9+.-]*:\/\//i.test(text) ? text : `https://${text}`;
  let url: URL;
  try {
    url = new URL(withScheme);
  } catch {
    const shown = text.replace(/\/\/[^/]*@/, '//***@');
    throw new XapiError('URL', shown, `${shown}: not a valid XAPI URL (expected https://HOST or http://HOST)`);
  }
  if (url.username !== '' || url.password !== '') {
    throw new XapiError(
      'URL',
      url.host,
      `the XAPI URL for ${url.host} must not contain credentials: set XAPI_USER and XAPI_PASSWORD instead`,
    );
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') {
    throw new XapiError('URL', text, `${displayUrl(url)}: XAPI URLs are http:// or https://`);
  }
  url.search = '';
  url.hash = '';
  return url;
}

/** Turns XAPI's failure codes into sentences naming what is wrong and where. */
function explain(error: XapiError, url: string, user: string, method: string, args: unknown[]): XapiError {
  const p = error.params;
  let message: string;
  switch (error.code) {
    case 'SESSION_AUTHENTICATION_FAILED':
      message = `XAPI at ${url} rejected the credentials of user ${user}`;
      break;
    case 'UUID_INVALID':
      message = `XAPI at ${url} has no ${p[0] ?? 'object'} with uuid ${p[1] ?? String(args[0])}`;
      break;
    case 'HANDLE_INVALID':
      message = `XAPI at ${url} no longer knows the ${p[0] ?? 'object'} ${p[1] ?? ''}`.trimEnd();
      break;
    case 'SESSION_INVALID':
      message = `XAPI at ${url} ended the session of user ${user} (SESSION_INVALID)`;
      break;
    case 'XENAPI_MISSING_PLUGIN':
      message =
        `the ${p[0] ?? String(args[1])} plugin is not installed on the pool master behind ${url}: ` +
        'install XenServer Container Management (the xscontainer supplemental pack) on the pool';
      break;
    case 'UNKNOWN_XENAPI_PLUGIN_FUNCTION':
      message =
        `the ${String(args[1])} plugin at ${url} has no function ${p[0] ?? String(args[2])}: ` +
        'its version is too old or it is not xscontainer';
      break;
    case 'XENAPI_PLUGIN_FAILURE': {
      const [fn = String(args[2]), kind = '', detail = ''] = p;
      message = `${String(args[1])} ${fn} failed on XAPI at ${url}: ${detail || kind || 'no detail given'}`;
      break;
    }
    case 'MESSAGE_METHOD_UNKNOWN':
      message = `XAPI at ${url} does not know the call ${p[0] ?? method}`;
      break;
    default:
      if (error.message.startsWith(`${error.code}(`)) {
        message = `XAPI at ${url}: ${method} failed with ${error.message}`;
      } else {
        return error;
      }
  }
  return new XapiError(error.code, url, oneLine(message), error.params);
}

/** Check what can be checked before any work: the URL's form and that credentials are set. */
export function checkXapiSettings(options: Pick<XapiConnectOptions, 'xapi' | 'env'>): void {
  const url = parseXapiUrl(options.xapi);
  credentials(options.env ?? process.env, url.origin);
}

function credentials(env: NodeJS.ProcessEnv, url: string): { user: string; password: string } {
  const user = env.XAPI_USER;
  const password = env.XAPI_PASSWORD;
  if (user === undefined || user === '' || password === undefined) {
    throw new XapiError(
      'CREDENTIALS',
      url,
      `set XAPI_USER and XAPI_PASSWORD in the environment to log in to XAPI at ${url}`,
    );
  }
  return { user, password };
}

async function makeAgent(url: URL, options: XapiConnectOptions): Promise<http.Agent> {
  if (url.protocol === 'http:') return new http.Agent({ keepAlive: true });
  let ca: string[] | undefined;
  if (options.ca !== undefined) {
    let pem: string;
    try {
      pem = await readFile(options.ca, 'utf8');
    } catch (error) {
      throw new InputError(options.ca, `cannot read the XAPI CA certificate file: ${(error as Error).message}`);
    }
    if (!pem.includes('-----BEGIN CERTIFICATE-----')) {
      throw new InputError(options.ca, 'not a PEM certificate file (no BEGIN CERTIFICATE line)');
    }
    ca = [...rootCertificates, pem];
  }
  return new https.Agent({ keepAlive: true, rejectUnauthorized: options.insecure !== true, ca });
}

function masterUrl(url: URL, address: string): URL {
  const next = new URL(url);
  // XAPI names the master by address alone; the scheme and port stay those the user chose.
  next.hostname = address.includes(':') && !address.startsWith('[') ? `[${address}]` : address;
  return next;
}

/**
 * Logs in (following HOST_IS_SLAVE to the pool master once), runs `fn`, and always logs out,
 * whether `fn` succeeds, fails or is cancelled. Errors are one-line XapiErrors; a password never
 * appears in them.
 */
export async function withXapiSession<T>(
  options: XapiConnectOptions,
  fn: (session: XapiSession) => Promise<T>,
): Promise<T> {
  const given = parseXapiUrl(options.xapi);
  const { user, password } = credentials(options.env ?? process.env, displayUrl(given));
  throwIfAborted(options.signal);
  const agent = await makeAgent(given, options);
  const timeoutMs = (options.callTimeoutSeconds ?? 60) * 1000;
  const endpoint: RpcEndpoint = { url: given, display: displayUrl(given), agent, timeoutMs };
  const { signal } = options;

  // A last guard: whatever a server echoes back, the password never leaves in an error.
  const scrub = (error: unknown): unknown => {
    if (password === '' || !(error instanceof Error) || !error.message.includes(password)) return error;
    const cleaned = error.message.split(password).join('***');
    return error instanceof XapiError
      ? new XapiError(error.code, error.url, cleaned, error.params)
      : new Error(cleaned);
  };

  try {
    let sessionRef: string | undefined;
    try {
      const login = async (): Promise<unknown> =>
        xmlRpcCall(endpoint, 'session.login_with_password', [user, password, '1.0', ORIGINATOR], signal);
      let ref: unknown;
      try {
        ref = await login();
      } catch (error) {
        if (!(error instanceof XapiError) || error.code !== 'HOST_IS_SLAVE') throw error;
        const address = error.params[0];
        if (address === undefined || address === '') {
          throw new XapiError(
            'HOST_IS_SLAVE',
            endpoint.display,
            `XAPI at ${endpoint.display} is a pool member but did not name its master`,
          );
        }
        const member = endpoint.display;
        endpoint.url = masterUrl(endpoint.url, address);
        endpoint.display = displayUrl(endpoint.url);
        try {
          ref = await login();
        } catch (again) {
          if (again instanceof XapiError && again.code === 'HOST_IS_SLAVE') {
            throw new XapiError(
              'HOST_IS_SLAVE',
              endpoint.display,
              `XAPI at ${member} named ${endpoint.display} as pool master, but that host is not the master either`,
            );
          }
          throw again;
        }
      }
      if (typeof ref !== 'string' || ref === '') {
        throw new XapiError('PROTOCOL', endpoint.display, `XAPI at ${endpoint.display} returned no session`);
      }
      sessionRef = ref;
    } catch (error) {
      throw error instanceof XapiError ? explain(error, endpoint.display, user, 'session.login_with_password', []) : error;
    }

    const session = sessionRef;
    let master: Promise<string> | undefined;
    const call = async (method: string, ...args: unknown[]): Promise<unknown> => {
      throwIfAborted(signal);
      try {
        return await xmlRpcCall(endpoint, method, [session, ...args], signal);
      } catch (error) {
        throw error instanceof XapiError ? explain(error, endpoint.display, user, method, args) : error;
      }
    };
    const api: XapiSession = {
      get url() {
        return endpoint.display;
      },
      user,
      call,
      master() {
        master ??= (async () => {
          const pools = await call('pool.get_all');
          if (!Array.isArray(pools) || typeof pools[0] !== 'string') {
            throw new XapiError('PROTOCOL', endpoint.display, `XAPI at ${endpoint.display} lists no pool`);
          }
          const ref = await call('pool.get_master', pools[0]);
          if (typeof ref !== 'string') {
            throw new XapiError('PROTOCOL', endpoint.display, `XAPI at ${endpoint.display} names no pool master`);
          }
          return ref;
        })();
        return master;
      },
      async callPlugin(plugin, fn, args) {
        const result = await call('host.call_plugin', await api.master(), plugin, fn, args);
        if (typeof result !== 'string') {
          throw new XapiError(
            'PROTOCOL',
            endpoint.display,
            `${plugin} ${fn} on XAPI at ${endpoint.display} returned a ${typeof result}, not a string`,
          );
        }
        return result;
      },
    };
    try {
      return await fn(api);
    } finally {
      // Logging out must survive a cancelled run, so it has its own deadline instead of the signal.
      await xmlRpcCall({ ...endpoint, timeoutMs: Math.min(timeoutMs, LOGOUT_TIMEOUT_MS) }, 'session.logout', [
        session,
      ]).catch(() => undefined);
    }
  } catch (error) {
    if (error instanceof CancelledError) throw error;
    throw scrub(error);
  } finally {
    agent.destroy();
  }
}
