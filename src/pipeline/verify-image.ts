import { printable } from '../errors.js';
import { formatImageRef, openImage, parseImageRef, type ImageRead } from '../docker/read-image.js';
import { diffManifests, dockerTarMtime, manifestWithDigest, type Difference, type Manifest } from '../manifest.js';
import { DiskState, diskSteps } from './disk.js';
import { exportRoot } from './export.js';
import type { PartitionChoice } from './map.js';
import { LABELS } from './pipeline.js';
import { FIT_LABELS } from './probe.js';
import type { RendererKind, StageTiming } from './runner.js';
import { rejectOnAbort, runScoped } from './scope.js';
import type { Engine } from './stage.js';

/**
 * `ddk2docker verify SOURCE --image REF`: the image's files against the disk's. The disk side runs
 * the conversion's own stages (fetch … map, export); the image side is read back from the daemon,
 * a docker-archive or an OCI layout. Three checks: the layer's diffID (exact proof), the source
 * labels, and the trees entry by entry.
 */

export interface VerifyImageOptions {
  source: string;
  /** A daemon image reference, docker-archive:FILE or oci:DIR. */
  image: string;
  engine: Engine;
  partition: PartitionChoice;
  sha256?: string;
  cacheDir: string;
  workdir?: string;
  renderer?: RendererKind;
  signal?: AbortSignal;
}

export interface LabelCheck {
  disk: string;
  image: string | null;
  equal: boolean;
  /** `error` counts against equality; `warning` is reported only (a file may be renamed). */
  level: 'error' | 'warning';
}

export interface VerifyImageResult {
  equal: boolean;
  source: { name: string; sha256: string };
  image: { ref: string; id?: string; layers: number };
  /** disk: of the export; image: the image config's first diff_id; read: of the layer bytes read back. */
  diffId: { disk: string; image: string; equal: boolean; read: string };
  labels: Record<string, LabelCheck>;
  /** exact: the layer read back is byte for byte the one the image names; docker: mtimes as Docker's tar writer keeps them. */
  precision: 'exact' | 'docker';
  /** The path the image says it added (label ddk2docker.uname-shim): left out of the comparison, and the diffIDs then differ by design. */
  ignored?: string;
  /** Entries on the disk side. */
  entries: number;
  differenceCount: number;
  /** The first DIFFERENCE_LIMIT differences, in path order. */
  differences: { path: string; field: Difference['field']; disk: Difference['expected']; image: Difference['actual'] }[];
  stages: StageTiming[];
}

export const DIFFERENCE_LIMIT = 50;

export async function verifyImage(opts: VerifyImageOptions): Promise<VerifyImageResult> {
  const ref = parseImageRef(opts.image);
  // A missing or malformed image must fail before a disk is decompressed.
  const handle = await openImage(ref);
  const d = new DiskState();
  let disk: { manifest: Manifest; diffId: string } | undefined;
  let image: ImageRead | undefined;

  const { stages } = await runScoped(opts, () => [
    ...diskSteps(d, { source: opts.source, cacheDir: opts.cacheDir, partition: opts.partition, ...(opts.sha256 ? { sha256: opts.sha256 } : {}) }),
    [
      {
        name: 'export',
        title: 'Export root file system',
        run: async (ctx) => {
          const layer = await exportRoot(ctx, d.root);
          try {
            [disk] = await Promise.all([manifestWithDigest(layer.stream, `${d.fetched.name}: partition ${d.root.index}`, (n) => ctx.progress.add(n)), Promise.race([layer.done, rejectOnAbort(ctx.signal)])]);
          } finally {
            layer.stream.destroy();
          }
        },
      },
      {
        name: 'verify',
        title: `Read ${formatImageRef(ref)}`,
        run: async (ctx) => {
          image = await handle.read(ctx.signal, (n) => ctx.progress.add(n));
        },
      },
    ],
  ]);
  return compare(d, formatImageRef(ref), handle.id, disk!, image!, stages);
}

function compare(d: DiskState, ref: string, id: string | undefined, disk: { manifest: Manifest; diffId: string }, image: ImageRead, stages: StageTiming[]): VerifyImageResult {
  const imageDiffId = image.diffIds[0]!;
  const labels: Record<string, LabelCheck> = {};
  const check = (key: string, expected: string, level: LabelCheck['level']) => {
    const actual = image.labels[key] ?? null;
    labels[key] = { disk: expected, image: actual, equal: actual === expected, level };
  };
  check(LABELS.sourceSha256, d.fetched.sha256, 'error');
  check(LABELS.sourceName, d.fetched.name, 'warning');

  const shim = image.labels[FIT_LABELS.unameShim]?.replace(/^(\.?\/)+/, '');
  // A layer read back byte for byte carries nanoseconds; one a daemon re-tarred carries what Docker keeps.
  const precision = image.layer.diffId === imageDiffId ? 'exact' : 'docker';
  const diffs = diffManifests(disk.manifest, image.layer.manifest, {
    ...(shim ? { ignore: (p: string) => p === shim } : {}),
    ...(precision === 'docker' ? { mtime: dockerTarMtime } : {}),
  });
  const diffIdEqual = disk.diffId === imageDiffId;
  const labelsEqual = Object.values(labels).every((l) => l.equal || l.level === 'warning');
  // The shim is appended to the layer, so its diffID cannot be the disk's: the trees, which leave
  // out exactly that path, are the proof then.
  return {
    equal: (diffIdEqual || shim !== undefined) && labelsEqual && diffs.length === 0 && image.diffIds.length === 1,
    source: { name: d.fetched.name, sha256: d.fetched.sha256 },
    image: { ref, ...(id ? { id } : {}), layers: image.diffIds.length },
    diffId: { disk: disk.diffId, image: imageDiffId, equal: diffIdEqual, read: image.layer.diffId },
    labels,
    precision,
    ...(shim ? { ignored: shim } : {}),
    entries: disk.manifest.size,
    differenceCount: diffs.length,
    differences: diffs.slice(0, DIFFERENCE_LIMIT).map((x) => ({ path: x.path, field: x.field, disk: x.expected, image: x.actual })),
    stages,
  };
}

/** The human report: a summary line, then each problem on its own line (names escaped). */
export function describeVerification(r: VerifyImageResult): string {
  const problems: string[] = [];
  if (!r.diffId.equal) problems.push(r.ignored === undefined ? 'diffID differs' : `diffID differs (the layer adds the uname shim ${printable(r.ignored)}, left out of the comparison)`);
  if (r.image.layers !== 1) problems.push(`${r.image.layers} layers`);
  for (const [k, l] of Object.entries(r.labels)) if (!l.equal) problems.push(`label ${k} differs${l.level === 'warning' ? ' (warning)' : ''}`);
  if (r.differenceCount) problems.push(`${r.differenceCount} file difference${r.differenceCount === 1 ? '' : 's'}`);
  const what = `${printable(r.source.name)} vs ${printable(r.image.ref)}`;
  const lines = [`${what}: ${r.equal ? 'equal' : 'different'}: ${r.entries} entries compared${problems.length ? `; ${problems.join(', ')}` : ''}`];
  if (!r.diffId.equal) lines.push(`  diffID: disk ${r.diffId.disk}, image ${r.diffId.image}`);
  for (const [k, l] of Object.entries(r.labels)) {
    if (!l.equal) lines.push(`  label ${k}: disk ${printable(JSON.stringify(l.disk))}, image ${l.image === null ? 'absent' : printable(JSON.stringify(l.image))}`);
  }
  for (const x of r.differences) {
    const value = (v: string | number | null) => (v === null ? 'absent' : printable(String(v)));
    lines.push(`  ${printable(x.path) || '/'}: ${x.field}: disk ${value(x.disk)}, image ${value(x.image)}`);
  }
  if (r.differenceCount > r.differences.length) lines.push(`  … and ${r.differenceCount - r.differences.length} more`);
  return `${lines.join('\n')}\n`;
}
