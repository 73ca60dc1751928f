import { constants, createReadStream } from 'node:fs';
import { access, readFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { Readable } from 'node:stream';
import { createGunzip } from 'node:zlib';
import type Docker from 'dockerode';
import { InputError } from '../errors.js';
import { readTar } from '../formats/tar.js';
import { manifestWithDigest, type Manifest } from '../manifest.js';
import { connect, daemonName, ping } from './daemon.js';

/**
 * Reading an image back, from any of the places ddk2docker writes one: the daemon (`docker save`,
 * streamed), a `docker-archive:FILE` (either `docker save` layout) or an `oci:DIR`. The layer is
 * streamed once: hashed and turned into a manifest on the way, never held in memory.
 */

/** Where an image is: the same forms as `--output`, or a daemon image reference. */
export type ImageRef = { kind: 'docker'; ref: string } | { kind: 'docker-archive'; path: string } | { kind: 'oci'; path: string };

export interface ImageRead {
  /** RootFS diff_ids as the image config states them. */
  diffIds: string[];
  labels: Record<string, string>;
  /** The first layer: sha256 and size of its uncompressed bytes as read, and its tree. */
  layer: { diffId: string; bytes: number; manifest: Manifest };
}

export function parseImageRef(text: string): ImageRef {
  const colon = text.indexOf(':');
  const kind = colon === -1 ? '' : text.slice(0, colon);
  if (kind === 'docker-archive' || kind === 'oci') {
    const path = text.slice(colon + 1);
    if (!path) throw new InputError(`--image ${JSON.stringify(text)}`, `${kind}: needs a path`);
    return { kind, path };
  }
  if (!text) throw new InputError('--image', 'needs an image reference, docker-archive:FILE or oci:DIR');
  return { kind: 'docker', ref: text };
}

export function formatImageRef(r: ImageRef): string {
  return r.kind === 'docker' ? r.ref : `${r.kind}:${r.path}`;
}

/** JSON entries of an archive (manifest, configs) are small; a bigger one is not what it claims. */
const JSON_LIMIT = 16 << 20;

interface ArchiveManifest {
  Config?: unknown;
  Layers?: unknown;
}

interface ConfigJson {
  rootfs?: { diff_ids?: unknown };
  config?: { Labels?: unknown };
}

function parseJson<T>(data: Buffer, input: string, what: string): T {
  try {
    return JSON.parse(data.toString('utf8')) as T;
  } catch (err) {
    throw new InputError(input, `${what} is not JSON: ${(err as Error).message}`);
  }
}

function fromConfig(config: ConfigJson, input: string): { diffIds: string[]; labels: Record<string, string> } {
  const ids = config.rootfs?.diff_ids;
  if (!Array.isArray(ids) || ids.length === 0 || !ids.every((d): d is string => typeof d === 'string' && /^sha256:[0-9a-f]{64}$/.test(d))) {
    throw new InputError(input, 'the image config has no valid rootfs.diff_ids');
  }
  const raw = config.config?.Labels;
  const labels: Record<string, string> = {};
  if (raw && typeof raw === 'object') for (const [k, v] of Object.entries(raw)) if (typeof v === 'string') labels[k] = v;
  return { diffIds: ids, labels };
}

/** A layer blob may be gzip-compressed (OCI); its diffID is that of the uncompressed tar. */
function uncompressed(first: Buffer, rest: AsyncIterable<Buffer>): Readable {
  async function* all(): AsyncGenerator<Buffer> {
    yield first;
    yield* rest;
  }
  const raw = Readable.from(all(), { objectMode: false });
  if (first[0] !== 0x1f || first[1] !== 0x8b) return raw;
  const gunzip = createGunzip();
  raw.once('error', (err) => gunzip.destroy(err));
  return raw.pipe(gunzip);
}

/**
 * A `docker save` stream or file, read in one pass. Which entry is the layer is known only from
 * manifest.json, which comes last: every layer-like entry (`ID/layer.tar`, or a blob that is not
 * JSON) is read as it passes, JSON entries are kept, and manifest.json then names the first layer.
 */
export async function readImageArchive(stream: Readable, input: string, onBytes?: (n: number) => void): Promise<ImageRead> {
  const json = new Map<string, Buffer>();
  const layers = new Map<string, ImageRead['layer']>();
  await readTar(stream, input, async (h, data) => {
    if (h.type !== 'file') return;
    const name = h.path.toString('utf8');
    const it = data[Symbol.asyncIterator]();
    const head = await it.next();
    if (head.done) return;
    const first = head.value;
    const rest = { [Symbol.asyncIterator]: () => it };
    const isLayer = name.endsWith('/layer.tar') || (name.startsWith('blobs/') && first[0] !== 0x7b);
    if (isLayer) {
      layers.set(name, await manifestWithDigest(uncompressed(first, rest), `${input}: layer ${name}`, onBytes));
      return;
    }
    if (h.size > JSON_LIMIT) return;
    const parts = [first];
    for await (const chunk of rest) parts.push(chunk);
    json.set(name, Buffer.concat(parts));
  });
  const manifestJson = json.get('manifest.json');
  if (!manifestJson) throw new InputError(input, 'no manifest.json: not a docker save archive');
  const images = parseJson<ArchiveManifest[]>(manifestJson, input, 'manifest.json');
  if (!Array.isArray(images) || images.length !== 1) throw new InputError(input, `manifest.json lists ${Array.isArray(images) ? images.length : 'no'} images, expected one`);
  const [{ Config, Layers }] = images as [ArchiveManifest];
  if (typeof Config !== 'string' || !json.has(Config)) throw new InputError(input, `the image config ${JSON.stringify(Config)} named by manifest.json is not in the archive`);
  if (!Array.isArray(Layers) || Layers.length === 0 || typeof Layers[0] !== 'string') throw new InputError(input, 'manifest.json names no layer');
  const layer = layers.get(Layers[0]);
  if (!layer) throw new InputError(input, `the layer ${JSON.stringify(Layers[0])} named by manifest.json is not in the archive`);
  return { ...fromConfig(parseJson<ConfigJson>(json.get(Config)!, input, Config), input), layer };
}

interface Descriptorish {
  digest?: unknown;
  mediaType?: unknown;
}

/** An image found and ready to be read: its metadata is checked before any layer is streamed. */
export interface ImageHandle {
  /** The image id (config digest) when the daemon names it. */
  id?: string;
  read(signal: AbortSignal, onBytes?: (n: number) => void): Promise<ImageRead>;
}

/** An OCI image layout directory holding one image (as `--output oci:DIR` writes it). */
async function openOciLayout(dir: string): Promise<ImageHandle> {
  const input = `oci:${dir}`;
  const blob = (d: Descriptorish | undefined, what: string): string => {
    if (typeof d?.digest !== 'string' || !/^sha256:[0-9a-f]{64}$/.test(d.digest)) throw new InputError(input, `${what} has no valid sha256 digest`);
    return join(dir, 'blobs', 'sha256', d.digest.slice(7));
  };
  const readJson = async <T>(path: string, what: string): Promise<T> => {
    let data: Buffer;
    try {
      data = await readFile(path);
    } catch (err) {
      throw new InputError(input, `cannot read ${what}: ${(err as Error).message}`);
    }
    return parseJson<T>(data, input, what);
  };
  const index = await readJson<{ manifests?: Descriptorish[] }>(join(dir, 'index.json'), 'index.json');
  if (!Array.isArray(index.manifests) || index.manifests.length !== 1) throw new InputError(input, `index.json lists ${Array.isArray(index.manifests) ? index.manifests.length : 'no'} images, expected one`);
  const manifest = await readJson<{ config?: Descriptorish; layers?: Descriptorish[] }>(blob(index.manifests[0], 'the manifest'), 'the image manifest');
  const config = fromConfig(await readJson<ConfigJson>(blob(manifest.config, 'the config'), 'the image config'), input);
  if (!Array.isArray(manifest.layers) || manifest.layers.length === 0) throw new InputError(input, 'the image manifest names no layer');
  const first = manifest.layers[0]!;
  const path = blob(first, 'the first layer');
  await access(path, constants.R_OK).catch((err: Error) => {
    throw new InputError(input, `cannot read the layer: ${err.message}`);
  });
  const gzip = typeof first.mediaType === 'string' && first.mediaType.endsWith('+gzip');
  return {
    read: async (signal, onBytes) => {
      const file = createReadStream(path, { signal });
      let tar: Readable = file;
      if (gzip) {
        tar = file.pipe(createGunzip());
        file.once('error', (err) => tar.destroy(err));
      }
      try {
        return { ...config, layer: await manifestWithDigest(tar, `${input}: layer`, onBytes) };
      } finally {
        file.destroy();
      }
    },
  };
}

async function openDockerArchive(path: string): Promise<ImageHandle> {
  await access(path, constants.R_OK).catch((err: Error) => {
    throw new InputError(path, `cannot read: ${err.message}`);
  });
  return {
    read: async (signal, onBytes) => {
      const file = createReadStream(path, { signal });
      try {
        return await readImageArchive(file, path, onBytes);
      } finally {
        file.destroy();
      }
    },
  };
}

/** The daemon's image, through `docker save` (GET /images/ID/get) streamed into the archive reader. */
async function openDaemonImage(docker: Docker, ref: string): Promise<ImageHandle> {
  await ping(docker);
  let id: string;
  try {
    id = (await docker.getImage(ref).inspect()).Id;
  } catch (err) {
    if ((err as { statusCode?: number }).statusCode === 404) throw new InputError(ref, `no such image in the Docker daemon at ${daemonName()}`);
    throw err;
  }
  return {
    id,
    read: async (signal, onBytes) => {
      const stream = (await docker.getImage(id).get()) as Readable;
      const onAbort = () => stream.destroy(signal.reason as Error);
      signal.addEventListener('abort', onAbort, { once: true });
      try {
        return await readImageArchive(stream, `docker save of ${ref}`, onBytes);
      } finally {
        signal.removeEventListener('abort', onAbort);
        stream.destroy();
      }
    },
  };
}

/** Find the image and check what can be checked cheaply; files are named by absolute path. */
export async function openImage(ref: ImageRef, docker?: Docker): Promise<ImageHandle> {
  if (ref.kind === 'docker') return openDaemonImage(docker ?? connect(), ref.ref);
  if (ref.kind === 'oci') return openOciLayout(resolve(ref.path));
  return openDockerArchive(resolve(ref.path));
}
