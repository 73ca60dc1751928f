import { PassThrough, type Readable } from 'node:stream';
import Docker from 'dockerode';
import { EnvironmentError } from '../errors.js';
import { parseTag } from './image.js';

/** The Docker daemon at DOCKER_HOST (or the default socket), through dockerode. */
export function connect(): Docker {
  return new Docker();
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
 * ("linux/386") sets the image's architecture (Engine API ≥ 1.32); without it the daemon uses its own.
 */
export async function importLayer(docker: Docker, tar: Readable, opts: { changes: string[]; message: string; platform?: string; signal: AbortSignal }): Promise<string> {
  const query = { changes: opts.changes, message: opts.message, ...(opts.platform ? { platform: opts.platform } : {}), abortSignal: opts.signal };
  const res = (await docker.importImage(tar as never, query as never)) as unknown as Readable;
  let text = '';
  for await (const chunk of res) text += chunk.toString();
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
  if (opts.platform) {
    // A daemon older than API 1.32 ignores the parameter: say so rather than mislabel the image.
    const info = await docker.getImage(id).inspect();
    const got = `${info.Os}/${info.Architecture}`;
    if (got !== opts.platform) {
      await removeImage(docker, id);
      throw new Error(`the Docker daemon at ${daemonName()} imported the image as ${got}, not ${opts.platform} (it needs Engine API 1.32 or later)`);
    }
  }
  return id;
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
