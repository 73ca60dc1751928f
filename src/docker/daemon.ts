import { PassThrough, Readable } from 'node:stream';
import { createRequire } from 'node:module';
import type Docker from 'dockerode';
import { EnvironmentError, throwIfAborted } from '../errors.js';
import { tarHeader } from './archive.js';
import { canonicalJson, imageConfig, parseTag, sha256Digest, type Architecture, type ContainerConfig } from './image.js';

/** The Docker daemon at DOCKER_HOST (or the default socket), through dockerode. */
export function connect(): Docker {
  // Required when first needed: dockerode and its dependencies (ssh2, gRPC) take longer to load
  // than the rest of the CLI, and the file outputs never use them.
  const Dockerode = createRequire(import.meta.url)('dockerode') as typeof Docker;
  return new Dockerode();
}

export function daemonName(): string {
  return process.env.DOCKER_HOST ?? 'unix:///var/run/docker.sock';
}

/** Fail early, with the address, when no daemon answers. */
export async function ping(docker: Docker): Promise<void> {
  try {
    await docker.ping();
  } catch (err) {
    throw new EnvironmentError(`no Docker daemon answers at ${daemonName()} (${(err as Error).message}); set DOCKER_HOST or use --output docker-archive:FILE`, { cause: err });
  }
}

interface JsonMessage {
  status?: string;
  error?: string;
  errorDetail?: { message?: string };
}

/**
 * Stream a tar into `POST /images/create?fromSrc=-` (no temp file) and return the new image's id.
 * The image is imported untagged: it is tagged only after it has been verified. `platform`
 * ("linux/386") sets the image's architecture from Docker 23 (API 1.42) on; older daemons ignore
 * it and use their own (see withArchitecture).
 */
export async function importLayer(docker: Docker, tar: Readable, opts: { changes: string[]; message: string; platform?: string; signal: AbortSignal }): Promise<string> {
  // Cut short while the layer is on its way, the request leaves the daemon a truncated tar, which it
  // refuses. Once the whole layer is sent the daemon makes the image whatever the client does: the
  // request then runs to its answer, so that the image's id is known and the run's cleanup removes it.
  const request = new AbortController();
  let sent = false;
  tar.once('end', () => (sent = true));
  const onAbort = () => {
    if (!sent) request.abort(opts.signal.reason);
  };
  opts.signal.addEventListener('abort', onAbort, { once: true });
  if (opts.signal.aborted) onAbort();
  const query = { changes: opts.changes, message: opts.message, ...(opts.platform ? { platform: opts.platform } : {}), abortSignal: request.signal };
  let text = '';
  try {
    const res = (await docker.importImage(tar as never, query as never)) as unknown as Readable;
    for await (const chunk of res) text += chunk.toString();
  } finally {
    opts.signal.removeEventListener('abort', onAbort);
  }
  let id: string | undefined;
  for (const line of text.split(/\r?\n/)) {
    if (!line.trim()) continue;
    let msg: JsonMessage;
    try {
      msg = JSON.parse(line) as JsonMessage;
    } catch {
      continue;
    }
    if (msg.error || msg.errorDetail) throw new Error(`docker import failed: ${msg.errorDetail?.message ?? msg.error}`);
    if (msg.status && /^sha256:[0-9a-f]{64}$/.test(msg.status.trim())) id = msg.status.trim();
  }
  if (!id) throw new Error(`docker import returned no image id: ${text.trim().slice(0, 200)}`);
  return id;
}

function daemonError(text: string, what: string): Error | undefined {
  for (const line of text.split(/\r?\n/)) {
    if (!line.trim()) continue;
    try {
      const msg = JSON.parse(line) as JsonMessage;
      if (msg.error || msg.errorDetail) return new Error(`${what} failed: ${msg.errorDetail?.message ?? msg.error}`);
    } catch {
      // not a JSON message: progress text
    }
  }
  return undefined;
}

/**
 * The imported image `id` with the given architecture. Docker before 23 imports every layer as
 * its own architecture, whatever the platform asked; then the image is made again by `docker load`
 * of an archive holding only manifest.json and the config: the daemon already has the layer (by its
 * diffID), so it reads no layer and writes none. The imported image is removed; the new one's id
 * is its config's digest, as with --output docker-archive.
 */
export async function withArchitecture(
  docker: Docker,
  id: string,
  want: { architecture: Architecture; config: ContainerConfig; diffId: string; signal: AbortSignal },
): Promise<string> {
  const info = await docker.getImage(id).inspect();
  if (info.Architecture === want.architecture) return id;
  const config = canonicalJson(imageConfig({ architecture: want.architecture, os: 'linux', diffId: want.diffId, config: want.config }));
  const digest = sha256Digest(config);
  const configName = `${digest.slice(7)}.json`;
  // The layer's path is named but never read: the daemon has a layer with that diffID.
  const manifest = Buffer.from(JSON.stringify([{ Config: configName, RepoTags: null, Layers: [`${want.diffId.slice(7)}/layer.tar`] }]));
  const pad = (n: number) => Buffer.alloc((512 - (n % 512)) % 512);
  const archive = Buffer.concat([
    tarHeader('manifest.json', 'file', manifest.length, 0), manifest, pad(manifest.length),
    tarHeader(configName, 'file', config.length, 0), config, pad(config.length),
    Buffer.alloc(1024),
  ]);
  // Not cut short once sent (a few hundred bytes): the daemon would make the image all the same,
  // unknown to the caller; the caller removes it if the run has been interrupted meanwhile.
  throwIfAborted(want.signal);
  const res = (await docker.loadImage(Readable.from([archive]) as never, { quiet: true } as never)) as unknown as Readable;
  let text = '';
  for await (const chunk of res) text += chunk.toString();
  const failed = daemonError(text, 'docker load of the image config');
  if (failed) throw failed;
  if (!text.includes(`Loaded image ID: ${digest}`)) throw new Error(`docker load of the image config did not load ${digest}: ${text.trim().slice(0, 200)}`);
  await removeImage(docker, id);
  return digest;
}

export async function tagImage(docker: Docker, id: string, ref: string): Promise<void> {
  const { repository, tag } = parseTag(ref);
  await docker.getImage(id).tag({ repo: repository, tag });
}

/** The id an image reference names now, or undefined when it names nothing. */
export async function imageIdOf(docker: Docker, ref: string): Promise<string | undefined> {
  try {
    return (await docker.getImage(ref).inspect()).Id;
  } catch (err) {
    if ((err as { statusCode?: number }).statusCode === 404) return undefined;
    throw err;
  }
}

export async function removeImage(docker: Docker, id: string): Promise<void> {
  try {
    await docker.getImage(id).remove({ force: true, noprune: false });
  } catch (err) {
    if ((err as { statusCode?: number }).statusCode !== 404) throw err;
  }
}

/** Run a command in a throw-away container without network; returns its exit code and output. */
export async function runOnce(docker: Docker, image: string, cmd: string[], opts: { signal: AbortSignal; timeoutSeconds?: number }): Promise<{ code: number; output: string }> {
  const container = await docker.createContainer({
    Image: image,
    Cmd: cmd,
    NetworkDisabled: true,
    HostConfig: { NetworkMode: 'none' },
    Labels: { 'ddk2docker.smoke': 'true' },
  });
  try {
    const out = new PassThrough();
    let output = '';
    out.on('data', (b: Buffer) => (output += b.toString()));
    const stream = await container.attach({ stream: true, stdout: true, stderr: true });
    container.modem.demuxStream(stream, out, out);
    await container.start();
    const timeout = (opts.timeoutSeconds ?? 300) * 1000;
    let timer: NodeJS.Timeout | undefined;
    const onAbort = () => void container.kill().catch(() => undefined);
    opts.signal.addEventListener('abort', onAbort, { once: true });
    try {
      const result = (await Promise.race([
        container.wait(),
        new Promise((_, reject) => (timer = setTimeout(() => reject(new Error(`smoke command still running after ${timeout / 1000} s`)), timeout))),
      ])) as { StatusCode: number };
      await new Promise((r) => setImmediate(r));
      return { code: result.StatusCode, output: output.trim() };
    } finally {
      clearTimeout(timer);
      opts.signal.removeEventListener('abort', onAbort);
    }
  } finally {
    await container.remove({ force: true }).catch(() => undefined);
  }
}

export async function imageLayers(docker: Docker, id: string): Promise<{ layers: string[]; labels: Record<string, string>; repoTags: string[] }> {
  const info = await docker.getImage(id).inspect();
  return { layers: info.RootFS?.Layers ?? [], labels: info.Config?.Labels ?? {}, repoTags: info.RepoTags ?? [] };
}
