import { rm } from 'node:fs/promises';
import { resolve } from 'node:path';
import { pipeline } from 'node:stream/promises';
import type Docker from 'dockerode';
import { connect, importLayer, ping, removeImage, withArchitecture } from '../docker/daemon.js';
import { applyChanges, type Architecture } from '../docker/image.js';
import type { LibvirtLxcResult } from '../docker/libvirt.js';
import { writeOutput, type Output } from '../docker/outputs.js';
import { InputError, namingFile } from '../errors.js';
import type { Layer } from './export.js';
import { LayerMeter } from './meter.js';
import type { StageContext } from './stage.js';

/** import: the layer tar into the daemon (streamed, untagged until verified) or into a file output. */
export interface Imported {
  /** Image id in the daemon, for --output docker. */
  imageId?: string;
  docker?: Docker;
  /** Written file or directory, for the file outputs. */
  path?: string;
  diffId: string;
  files: number;
  bytes: number;
  /** For --output libvirt-lxc. */
  libvirt?: LibvirtLxcResult;
}

export interface ImageSpec {
  changes: string[];
  labels: Record<string, string>;
  architecture: Architecture;
  tag?: string;
  message: string;
}

/** LABEL instruction in Dockerfile syntax, with both key and value quoted. */
export function labelChange(labels: Record<string, string>): string[] {
  // Inside double quotes Docker undoes only \\, \" and \$ ("$": values from the image, such as the
  // release line, must not be taken for variables); JSON's \u001b would stay as six characters, so
  // control characters go in raw. A newline would end the instruction: no spelling carries it.
  const q = (s: string, k: string) => {
    if (s.includes('\n')) throw new InputError(`label ${JSON.stringify(k)}`, 'contains a newline, which a Docker LABEL cannot hold');
    return `"${s.replace(/["\\$]/g, (c) => `\\${c}`)}"`;
  };
  const pairs = Object.entries(labels).map(([k, v]) => `${q(k, k)}=${q(v, k)}`);
  return pairs.length ? [`LABEL ${pairs.join(' ')}`] : [];
}

export async function importStage(ctx: StageContext, layer: Layer, output: Output, spec: ImageSpec): Promise<Imported> {
  // The file outputs compute the diffID as they write; only the daemon path needs the meter's.
  const meter = new LayerMeter({ hash: output.kind === 'docker' }, (n) => ctx.progress.add(n));
  const changes = [...labelChange(spec.labels), ...spec.changes];
  if (output.kind === 'docker') {
    const docker = connect();
    await ping(docker);
    const metered = layer.stream.pipe(meter);
    layer.stream.once('error', (err) => metered.destroy(err));
    const importing = importLayer(docker, metered, { changes, message: spec.message, platform: `linux/${spec.architecture}`, signal: ctx.signal }).then((id) => {
      ctx.cleanup.onFailure(`remove image ${id}`, () => removeImage(docker, id));
      return id;
    });
    // Both settle before the stage ends, so an image the daemon makes is known to the cleanup even
    // when the layer fails first.
    const [imported, exported] = await Promise.allSettled([importing, layer.done]);
    if (exported.status === 'rejected') throw exported.reason;
    if (imported.status === 'rejected') throw imported.reason;
    const importedId = imported.value;
    const imageId = await withArchitecture(docker, importedId, { architecture: spec.architecture, config: applyChanges({}, changes), diffId: meter.diffId, signal: ctx.signal });
    if (imageId !== importedId) ctx.cleanup.onFailure(`remove image ${imageId}`, () => removeImage(docker, imageId));
    return { imageId, docker, diffId: meter.diffId, files: meter.files, bytes: meter.bytes };
  }
  const config = applyChanges({}, changes);
  const [result] = await Promise.all([
    writeOutput(output, meter, { architecture: spec.architecture, config, ...(spec.tag ? { tag: spec.tag } : {}) }, { signal: ctx.signal }),
    pipeline(layer.stream, meter, { signal: ctx.signal, end: true }).catch((err: unknown) => {
      meter.destroy(err as Error);
      // A full file system fails the writer and, first, this pump: name the output either way.
      throw namingFile(err, resolve(output.path));
    }),
    layer.done,
  ]);
  // Complete, but the run may still fail after this stage: then it must not be left looking like a result.
  ctx.cleanup.onFailure(`remove ${result.path}`, () => rm(result.path, { recursive: true, force: true }));
  return { path: result.path, diffId: result.diffId, files: meter.files, bytes: meter.bytes, ...(result.libvirt ? { libvirt: result.libvirt } : {}) };
}
