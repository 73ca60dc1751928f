import { PassThrough, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { constants as zlibConstants, createGzip } from 'node:zlib';
import { applyChanges, MEDIA_TYPES } from '../docker/image.js';
import { buildImage } from '../docker/oci.js';
import { credentialsFromEnv, parsePushRef, RegistryClient } from '../docker/registry.js';
import type { Layer } from './export.js';
import { labelChange, type ImageSpec, type Imported } from './import.js';
import { formatBytes } from './runner.js';
import { Handoff } from './scope.js';
import type { StageContext } from './stage.js';

/**
 * --push REGISTRY/REPO:TAG. The one layer stream is split: one branch goes to the output as
 * always, the other, gzip-compressed on the way, into a registry upload (upload stage, beside
 * import). The config and the manifest follow only after verify (push stage, last): the
 * manifest PUT is what makes the tag visible, so a failed run tags nothing. Blobs of a failed
 * run stay in the registry unreferenced, which is harmless: no tag or manifest names them, and
 * the registry's garbage collection removes them.
 */

export interface Pushed {
  /** registry/repository:tag */
  ref: string;
  /** Digest of the manifest: pull by `ref@digest` to get exactly this image. */
  digest: string;
}

export interface PushOptions {
  ref: string;
  insecure?: boolean;
}

/**
 * gzip, because every registry and every Docker accepts it (uncompressed OCI layers are legal but
 * rarely seen), and each runner of a fleet pulls half the bytes; level 1, because it gets almost
 * level 6's size (on binaries: 49.6 % vs 47.1 %) at twice the speed (91 vs 45 MB/s per core).
 */
const GZIP_LEVEL = zlibConstants.Z_BEST_SPEED;

/** One readable into two, each read at the pace of the slower reader (pipe's backpressure). */
function tee(source: Readable): [Readable, Readable] {
  const branches: [PassThrough, PassThrough] = [new PassThrough({ highWaterMark: 1 << 20 }), new PassThrough({ highWaterMark: 1 << 20 })];
  for (const b of branches) {
    source.pipe(b);
    // A source error reaches the run through the export stage (layer.done); a branch whose reader
    // has already failed and left must not crash the process with it.
    b.on('error', () => undefined);
  }
  source.once('error', (err) => branches.forEach((b) => b.destroy(err)));
  source.once('close', () => {
    if (!source.readableEnded) branches.forEach((b) => b.destroy(new Error('the layer stream stopped before its end')));
  });
  return branches;
}

export class Push {
  private readonly branch = new Handoff<Readable>();
  private layer: { digest: string; size: number } | undefined;

  private constructor(private readonly client: RegistryClient) {}

  /** Before any work: the reference parses, the registry answers and accepts our credentials. */
  static async connect(opts: PushOptions, signal?: AbortSignal): Promise<Push> {
    const ref = parsePushRef(opts.ref);
    const credentials = credentialsFromEnv();
    return new Push(await RegistryClient.connect(ref, { ...(opts.insecure ? { insecure: true } : {}), ...(credentials ? { credentials } : {}) }, signal));
  }

  get ref(): string {
    return this.client.ref.ref;
  }

  /** The layer for the output; the registry gets the other branch. */
  tap(layer: Layer): Layer {
    const [toOutput, toRegistry] = tee(layer.stream);
    this.branch.set(toRegistry);
    return { stream: toOutput, done: layer.done };
  }

  /** upload stage: the layer blob, streamed as it is produced. */
  async upload(ctx: StageContext): Promise<void> {
    // The run's signal has many listeners already (every stage's streams): ours go on a signal that follows it.
    const signal = AbortSignal.any([ctx.signal]);
    const branch = await this.branch.get(signal);
    this.client.signal = signal;
    const gzip = createGzip({ level: GZIP_LEVEL, chunkSize: 1 << 18 });
    const [layer] = await Promise.all([
      this.client.pushStream(gzip, (n) => ctx.progress.add(n)),
      pipeline(branch, gzip, { signal }),
    ]);
    this.layer = layer;
    ctx.note(`layer ${this.layer.digest} (${formatBytes(this.layer.size)}, gzip) uploaded`);
  }

  /** push stage: the config, then the manifest under the tag. */
  async publish(ctx: StageContext, imported: Imported, spec: ImageSpec): Promise<Pushed> {
    if (!this.layer) throw new Error('push: the layer was not uploaded');
    this.client.signal = AbortSignal.any([ctx.signal]);
    const config = applyChanges({}, [...labelChange(spec.labels), ...spec.changes]);
    const image = buildImage(
      { architecture: spec.architecture, config },
      { diffId: imported.diffId, layerBytes: imported.bytes, digest: this.layer.digest, storedBytes: this.layer.size },
      true,
    );
    await this.client.pushBlob(image.config.bytes);
    const digest = await this.client.putManifest(image.manifest.bytes, MEDIA_TYPES.manifest);
    ctx.note(`${this.ref}@${digest}`);
    return { ref: this.ref, digest };
  }
}
