import { mkdir, open, rename, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import type { Readable } from 'node:stream';
import {
  blob, imageConfig, imageIndex, imageManifest, MEDIA_TYPES, parseTag, resolveCreated,
  type Descriptor, type ImageMeta,
} from './image.js';
import { checkGzipLevel, replaceOnSuccess, writeLayer, type LayerWrite, type OutputResult, type WriteOptions } from './rootfs.js';

/** The JSON blobs of a one-layer image, shared by the OCI layout and the docker-archive writers. */
export interface ImageBlobs {
  config: { bytes: Buffer; descriptor: Descriptor };
  manifest: { bytes: Buffer; descriptor: Descriptor };
  /** index.json: the manifest, annotated with the tag when there is one. */
  index: Buffer;
}

export function buildImage(meta: ImageMeta, layer: LayerWrite, compressed: boolean): ImageBlobs {
  const created = resolveCreated(meta.created);
  const os = meta.os ?? 'linux';
  const config = blob(MEDIA_TYPES.config, imageConfig({ created, architecture: meta.architecture, os, diffId: layer.diffId, config: meta.config, history: meta.history }));
  const layerDescriptor: Descriptor = { mediaType: compressed ? MEDIA_TYPES.layerGzip : MEDIA_TYPES.layer, digest: layer.digest, size: layer.storedBytes };
  const manifest = blob(MEDIA_TYPES.manifest, imageManifest(config.descriptor, [layerDescriptor]));
  const tag = meta.tag === undefined ? undefined : parseTag(meta.tag);
  const annotations: Record<string, string> = {};
  // Tools resolve oci:DIR:TAG by this annotation (the tag part only, as `docker save` writes it).
  if (tag) annotations['org.opencontainers.image.ref.name'] = tag.tag;
  // containerd (and Docker with the containerd store) names loaded images by this one.
  if (tag) annotations['io.containerd.image.name'] = tag.fullName;
  const entry: Descriptor = { ...manifest.descriptor, platform: { architecture: meta.architecture, os } };
  if (tag) entry.annotations = annotations;
  return { config, manifest, index: blob(MEDIA_TYPES.index, imageIndex([entry])).bytes };
}

/** What a written image output reports, from its layer and blobs. */
export function imageResult(target: string, written: LayerWrite, image: ImageBlobs): OutputResult {
  return {
    path: resolve(target),
    diffId: written.diffId,
    layerBytes: written.layerBytes,
    layerDigest: written.digest,
    storedBytes: written.storedBytes,
    configDigest: image.config.descriptor.digest,
    manifestDigest: image.manifest.descriptor.digest,
  };
}

export const OCI_LAYOUT = Buffer.from('{"imageLayoutVersion":"1.0.0"}');

export function blobPath(digest: string): string {
  return `blobs/sha256/${digest.slice('sha256:'.length)}`;
}

/**
 * `oci:DIR`: an OCI image layout. The layer is streamed to a temporary name inside blobs/sha256
 * and renamed once its digest is known; with `gzip` the blob is compressed and its digest differs
 * from the diffID, both computed in the same pass.
 */
export async function writeOciLayout(layer: Readable, target: string, meta: ImageMeta, gzip: boolean, opts: WriteOptions): Promise<OutputResult> {
  if (meta.tag !== undefined) parseTag(meta.tag);
  const gzipLevel = gzip ? checkGzipLevel(opts.gzipLevel) : undefined;
  return replaceOnSuccess(target, 'directory', opts.signal, async (dir) => {
    const blobs = join(dir, 'blobs', 'sha256');
    await mkdir(blobs, { recursive: true });
    const partial = join(blobs, '.layer.partial');
    const file = await open(partial, 'w', 0o644);
    let written: LayerWrite;
    try {
      written = await writeLayer(layer, file, 0, { gzipLevel, signal: opts.signal, onProgress: opts.onProgress });
    } finally {
      await file.close();
    }
    await rename(partial, join(dir, blobPath(written.digest)));
    const image = buildImage(meta, written, gzip);
    await writeFile(join(dir, blobPath(image.config.descriptor.digest)), image.config.bytes);
    await writeFile(join(dir, blobPath(image.manifest.descriptor.digest)), image.manifest.bytes);
    await writeFile(join(dir, 'index.json'), image.index);
    await writeFile(join(dir, 'oci-layout'), OCI_LAYOUT);
    return imageResult(target, written, image);
  });
}
