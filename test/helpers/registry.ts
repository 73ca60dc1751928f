import { createSign, randomBytes } from 'node:crypto';
import { createServer as createHttpServer, type Server } from 'node:http';
import { connect, createServer, type AddressInfo } from 'node:net';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { stringify } from 'yaml';

/**
 * Debian's docker-registry (distribution 2.8) on a free loopback port, for push tests: anonymous,
 * htpasswd (Basic) or token (Bearer) auth, optionally TLS with a self-signed certificate.
 */
export interface Registry {
  /** 127.0.0.1:PORT */
  host: string;
  dir: string;
  stop(): Promise<void>;
}

export interface User {
  user: string;
  password: string;
}

export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address() as AddressInfo;
  await new Promise((r) => server.close(r));
  return port;
}

async function listening(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(port, '127.0.0.1');
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

/** A self-signed certificate and its key (PEM files in dir). */
export async function selfSigned(dir: string, name: string): Promise<{ cert: string; key: string }> {
  const cert = join(dir, `${name}.crt`);
  const key = join(dir, `${name}.key`);
  await execa('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '1', '-subj', `/CN=${name}`, '-addext', 'subjectAltName=IP:127.0.0.1']);
  return { cert, key };
}

export async function startRegistry(opts: { htpasswd?: User; tls?: boolean; token?: TokenServer } = {}): Promise<Registry> {
  const dir = await mkdtemp(join(tmpdir(), 'registry-'));
  const port = await freePort();
  const http: Record<string, unknown> = { addr: `127.0.0.1:${port}` };
  if (opts.tls) {
    const { cert, key } = await selfSigned(dir, 'registry');
    http.tls = { certificate: cert, key };
  }
  let auth: Record<string, unknown> | undefined;
  if (opts.htpasswd) {
    // distribution reads bcrypt only; libxcrypt's crypt(3) (through perl) makes one.
    const salt = randomBytes(16).toString('base64').replace(/[^A-Za-z0-9]/g, '.').slice(0, 22);
    const { stdout: hash } = await execa('perl', ['-e', 'print crypt($ARGV[0], $ARGV[1])', opts.htpasswd.password, `$2b$05$${salt}`]);
    if (!hash.startsWith('$2b$')) throw new Error(`crypt(3) made no bcrypt hash: ${hash}`);
    await writeFile(join(dir, 'htpasswd'), `${opts.htpasswd.user}:${hash}\n`);
    auth = { htpasswd: { realm: 'ddk-test', path: join(dir, 'htpasswd') } };
  }
  if (opts.token) auth = { token: { realm: opts.token.realm, service: opts.token.service, issuer: opts.token.issuer, rootcertbundle: opts.token.cert } };
  const config = { version: 0.1, log: { level: 'warn' }, storage: { filesystem: { rootdirectory: join(dir, 'data') } }, http, ...(auth ? { auth } : {}) };
  await writeFile(join(dir, 'config.yml'), stringify(config));
  const child = execa('docker-registry', ['serve', join(dir, 'config.yml')], { reject: false, all: true });
  const stop = async () => {
    child.kill('SIGTERM');
    await child;
    await rm(dir, { recursive: true, force: true });
  };
  for (let i = 0; i < 100 && !(await listening(port)); i++) {
    if (child.exitCode !== null) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  if (!(await listening(port))) {
    await stop();
    throw new Error(`docker-registry did not start: ${String((await child).all)}`);
  }
  return { host: `127.0.0.1:${port}`, dir, stop };
}

/**
 * A token service as the Docker token spec describes it: Basic credentials in, a JWT (RS256,
 * its certificate in x5c) granting pull and push on the asked repository out.
 */
export interface TokenServer {
  realm: string;
  service: string;
  issuer: string;
  /** The certificate the registry trusts (rootcertbundle). */
  cert: string;
  /** Requests seen, for assertions: the scope asked and whether credentials came. */
  requests: { scope: string | null; user: string | null }[];
  stop(): Promise<void>;
}

/** `expireFirst`: the first token is already expired (beyond the registry's 60 s leeway), as one that ran out during a long conversion. */
export async function startTokenServer(user: User, opts: { expireFirst?: boolean } = {}): Promise<TokenServer> {
  const dir = await mkdtemp(join(tmpdir(), 'token-'));
  const { cert, key } = await selfSigned(dir, 'token');
  const keyPem = await readFile(key, 'utf8');
  const der = Buffer.from((await readFile(cert, 'utf8')).replace(/-----[^-]+-----|\s/g, ''), 'base64').toString('base64');
  const service = 'ddk-test-registry';
  const issuer = 'ddk-test-issuer';
  const requests: TokenServer['requests'] = [];
  const b64url = (v: unknown) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const server: Server = createHttpServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://x');
    const scope = url.searchParams.get('scope');
    const m = /^Basic (.+)$/.exec(req.headers.authorization ?? '');
    const [u, p] = m ? Buffer.from(m[1]!, 'base64').toString().split(/:(.*)/s) : [null, null];
    requests.push({ scope, user: u ?? null });
    if (u !== user.user || p !== user.password) {
      res.writeHead(401, { 'content-type': 'application/json' }).end('{"details":"bad credentials"}');
      return;
    }
    const now = Math.floor(Date.now() / 1000) - (opts.expireFirst && requests.length === 1 ? 600 : 0);
    const [, type, name, actions] = /^(repository):([^:]+):(.+)$/.exec(scope ?? '') ?? [];
    const claims = {
      iss: issuer, sub: u, aud: service, exp: now + 300, nbf: now - 10, iat: now, jti: randomBytes(8).toString('hex'),
      access: type ? [{ type, name, actions: actions!.split(',') }] : [],
    };
    const signing = `${b64url({ typ: 'JWT', alg: 'RS256', x5c: [der] })}.${b64url(claims)}`;
    const signature = createSign('RSA-SHA256').update(signing).sign(keyPem).toString('base64url');
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ token: `${signing}.${signature}` }));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address() as AddressInfo;
  return {
    realm: `http://127.0.0.1:${port}/token`,
    service,
    issuer,
    cert,
    requests,
    stop: async () => {
      await new Promise((r) => server.close(r));
      await rm(dir, { recursive: true, force: true });
    },
  };
}
