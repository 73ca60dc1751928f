import type { Readable } from 'node:stream';
import { InputError } from '../errors.js';
import { writeDockerArchive } from './archive.js';
import { blob, imageConfig, MEDIA_TYPES, parseTag, resolveCreated, type ImageMeta } from './image.js';
import { checkLibvirtTarget, writeLibvirtLxc } from './libvirt.js';
import { writeOciLayout } from './oci.js';
import { writeRootfs, type OutputResult, type WriteOptions } from './rootfs.js';

export type { ImageMeta } from './image.js';
export type { OutputResult, WriteOptions } from './rootfs.js';

/** Where `--output` sends the image. */
export type Output =
  | { kind: 'docker' }
  | { kind: 'docker-archive'; path: string }
  /** `gzip` compresses the layer blob; not expressible in the target string, set by the caller. */
  | { kind: 'oci'; path: string; gzip: boolean }
  | { kind: 'rootfs'; path: string; gzip: boolean }
  /** The tree unpacked into DIR/rootfs, with DIR/domain.xml to boot it as a libvirt LXC domain. */
  | { kind: 'libvirt-lxc'; path: string };

const FORMS = 'docker, docker-archive:FILE, oci:DIR, rootfs:FILE.tar, rootfs:FILE.tar.gz or libvirt-lxc:DIR';

export function parseOutput(target: string): Output {
  const bad = (problem: string): never => {
    throw new InputError(`--output ${JSON.stringify(target)}`, `${problem}; valid forms: ${FORMS}`);
  };
  if (target === 'docker') return { kind: 'docker' };
  const colon = target.indexOf(':');
  if (colon === -1) return bad('unknown output');
  const kind = target.slice(0, colon);
  const path = target.slice(colon + 1);
  if (kind !== 'docker-archive' && kind !== 'oci' && kind !== 'rootfs' && kind !== 'libvirt-lxc') return bad(`unknown output kind ${JSON.stringify(kind)}`);
  if (path === '') return bad(`${kind}: needs a path`);
  if (kind === 'docker-archive' || kind === 'libvirt-lxc') return { kind, path };
  if (kind === 'oci') return { kind, path, gzip: false };
  if (path.endsWith('.tar.gz')) return { kind, path, gzip: true };
  if (path.endsWith('.tar')) return { kind, path, gzip: false };
  return bad('a rootfs file name must end in .tar or .tar.gz');
}

/** Refuse a target that cannot be written before any work is done; writing checks it again. */
export async function preflightOutput(output: Output): Promise<void> {
  if (output.kind === 'libvirt-lxc') await checkLibvirtTarget(output.path);
}

/** The target string back, for messages and `--json`. */
export function formatOutput(output: Output): string {
  return output.kind === 'docker' ? 'docker' : `${output.kind}:${output.path}`;
}

/**
 * Write the layer (one uncompressed tar stream of the root file system) and the image metadata to
 * a file output, streaming: the layer is read once, hashed on the way, never held in memory. On
 * failure or abort nothing is left at the target and an existing target is untouched.
 */
export async function writeOutput(output: Output, layer: Readable, meta: ImageMeta, opts: WriteOptions = {}): Promise<OutputResult> {
  try {
    // Bad metadata must fail before gigabytes are streamed, not after.
    resolveCreated(meta.created);
    if (meta.tag !== undefined) parseTag(meta.tag);
    switch (output.kind) {
      case 'docker':
        throw new Error('the docker output is written by the import stage (docker daemon), not by writeOutput');
      case 'docker-archive':
        return await writeDockerArchive(layer, output.path, meta, opts);
      case 'oci':
        return await writeOciLayout(layer, output.path, meta, output.gzip, opts);
      case 'rootfs': {
        const { path, diffId, layerBytes, digest, storedBytes } = await writeRootfs(layer, output.path, output.gzip, opts);
        const config = blob(MEDIA_TYPES.config, imageConfig({ ...meta, os: meta.os ?? 'linux', diffId }));
        return { path, diffId, layerBytes, layerDigest: digest, storedBytes, configDigest: config.descriptor.digest };
      }
      case 'libvirt-lxc':
        return await writeLibvirtLxc(layer, output.path, meta, opts);
    }
  } catch (e) {
    // Producers upstream of the layer must learn that nobody reads it any more.
    layer.destroy();
    throw e;
  }
}
