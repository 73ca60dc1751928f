import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import envPaths from 'env-paths';
import { CancelledError, InputError } from '../errors.js';
import { detectSource } from '../formats/detect.js';
import { FileSource } from '../formats/source.js';
import { parseTag, type Architecture } from '../docker/image.js';
import { formatOutput, parseOutput } from '../docker/outputs.js';
import { VERSION } from '../version.js';
import { Cleanup } from './cleanup.js';
import { convert, type RawDisk } from './convert.js';
import { decompress } from './decompress.js';
import { exportRoot, type Layer } from './export.js';
import { extract, type Extracted } from './extract.js';
import { fetchSource, normalizeSha256, type FetchedSource } from './fetch.js';
import { importStage, type Imported } from './import.js';
import { mapRoot, type MappedRoot, type PartitionChoice } from './map.js';
import { runSteps, type RendererKind, type StageTiming, type Step } from './runner.js';
import type { Engine, StageContext } from './stage.js';
import { registerStage, type RegisterOptions, type Registered } from './register.js';
import { DEFAULT_SMOKE, verify, type Verified } from './verify.js';

export interface ConvertOptions {
  source: string;
  tag?: string;
  engine: Engine;
  output: string;
  sha256?: string;
  partition: PartitionChoice;
  changes: string[];
  labels: Record<string, string>;
  smoke?: string;
  workdir?: string;
  keepWorkdir?: boolean;
  cacheDir?: string;
  architecture?: Architecture;
  renderer?: RendererKind;
  register?: RegisterOptions;
  signal?: AbortSignal;
}

export interface ConvertResult {
  image: { id: string; tag: string | null } | null;
  output: string;
  path?: string;
  diffId: string;
  files: number;
  bytes: number;
  engine: Engine;
  source: { name: string; sha256: string; size: number; kind: string; url?: string };
  ova?: { label?: string; vdiSize: number; chunks: number[] };
  partition: { index: number; offset: number; size: number };
  smoke?: string;
  registered?: Registered;
  workdir?: string;
  stages: StageTiming[];
}

export const LABELS = {
  sourceName: 'ddk2docker.source.name',
  sourceSha256: 'ddk2docker.source.sha256',
  ovaLabel: 'ddk2docker.ova.label',
  version: 'ddk2docker.version',
} as const;

export function defaultCacheDir(): string {
  return envPaths('ddk2docker', { suffix: '' }).cache;
}

/** The whole conversion: fetch → extract → decompress → convert → map → export → import → verify. */
export async function convertDdk(opts: ConvertOptions): Promise<ConvertResult> {
  const output = parseOutput(opts.output);
  if (opts.tag) parseTag(opts.tag);
  if (opts.sha256) normalizeSha256(opts.sha256);
  if (opts.register && output.kind !== 'docker') throw new InputError('--register-vm', 'registering needs --output docker: xscontainer monitors containers in the VM\'s Docker daemon');
  for (const k of Object.keys(opts.labels)) if (!k) throw new InputError('--label', 'a label needs a key (K=V)');

  const controller = new AbortController();
  const onOuterAbort = () => controller.abort(new CancelledError());
  opts.signal?.addEventListener('abort', onOuterAbort, { once: true });
  if (opts.signal?.aborted) controller.abort(new CancelledError());

  const cleanup = new Cleanup();
  const parent = resolve(opts.workdir ?? tmpdir());
  await mkdir(parent, { recursive: true });
  const workdir = await mkdtemp(join(parent, 'ddk2docker-'));
  if (!opts.keepWorkdir) cleanup.defer(`remove ${workdir}`, () => rm(workdir, { recursive: true, force: true }));

  let failed = true;
  let firstError: unknown;
  const abort = (err: unknown) => {
    firstError ??= err;
    if (!controller.signal.aborted) controller.abort(err);
  };

  let fetched!: FetchedSource;
  let kind = 'unknown';
  let extracted: Extracted | undefined;
  let disk!: { path: string; name: string; owned: boolean };
  let raw!: RawDisk;
  let root!: MappedRoot;
  let layer: Layer | undefined;
  let layerReady: (l: Layer) => void = () => {};
  const layerPromise = new Promise<Layer>((r) => (layerReady = r));
  let imported!: Imported;
  let verified: Verified = {};
  let registered: Registered | undefined;
  const labels: Record<string, string> = {};

  const steps: Step[] = [
    {
      name: 'fetch',
      title: `Fetch ${opts.source}`,
      run: async (ctx) => {
        fetched = await fetchSource(ctx, opts.source, { cacheDir: opts.cacheDir ?? defaultCacheDir(), ...(opts.sha256 ? { sha256: opts.sha256 } : {}) });
        const src = await FileSource.open(fetched.path, fetched.name);
        try {
          kind = await detectSource(src);
        } finally {
          await src.close();
        }
        if (kind === 'unknown') throw new InputError(fetched.name, 'not a DDK ISO, XVA, VHD or disk image (no ISO 9660 volume descriptor, VHD footer, partition table or ext superblock)');
        if (kind === 'xva') throw new InputError(fetched.name, 'XVA (version 2) input is not supported yet');
        if (kind !== 'iso') disk = { path: fetched.path, name: fetched.name, owned: false };
      },
    },
    {
      name: 'extract',
      title: 'Extract ova.xml and chunks',
      run: async (ctx) => {
        if (kind !== 'iso') return;
        extracted = await extract(ctx, fetched.path, fetched.name);
        const present = extracted.chunks.map((c) => c.index);
        ctx.note(`${extracted.ova.label ?? 'unnamed VM'}: ${extracted.ova.rootVdi.size} bytes in ${present.length} chunks`);
      },
    },
    {
      name: 'decompress',
      title: 'Decompress chunks',
      run: async (ctx) => {
        if (!extracted) return;
        const d = await decompress(ctx, extracted, fetched.name);
        disk = { path: d.path, name: `${fetched.name}:${extracted.chunkDir}`, owned: true };
      },
    },
    {
      name: 'convert',
      title: 'Convert to raw',
      run: async (ctx) => {
        raw = await convert(ctx, disk, extracted?.ova.rootVdi.size);
      },
    },
    {
      name: 'map',
      title: 'Map root partition',
      run: async (ctx) => {
        root = await mapRoot(ctx, raw, disk.name, opts.partition);
      },
    },
    [
      {
        name: 'export',
        title: 'Export root file system',
        run: async (ctx) => {
          layer = await exportRoot(ctx, root);
          layerReady(layer);
          await layer.done;
        },
      },
      {
        name: 'import',
        title: output.kind === 'docker' ? 'Import into Docker' : `Write ${formatOutput(output)}`,
        run: async (ctx) => {
          Object.assign(labels, {
            [LABELS.sourceName]: fetched.name,
            [LABELS.sourceSha256]: fetched.sha256,
            ...(extracted?.ova.label ? { [LABELS.ovaLabel]: extracted.ova.label } : {}),
            [LABELS.version]: VERSION,
            ...opts.labels,
          });
          imported = await importStage(ctx, await Promise.race([layerPromise, rejectOnAbort(controller.signal)]), output, {
            changes: opts.changes,
            labels,
            architecture: opts.architecture ?? 'amd64',
            ...(opts.tag ? { tag: opts.tag } : {}),
            message: `ddk2docker ${VERSION} from ${fetched.name}`,
          });
        },
      },
    ],
    {
      name: 'verify',
      title: 'Verify',
      run: async (ctx) => {
        verified = await verify(ctx, imported, { smoke: opts.smoke ?? DEFAULT_SMOKE, labels, ...(opts.tag ? { tag: opts.tag } : {}) });
      },
    },
    ...(opts.register
      ? [
          {
            name: 'register' as const,
            title: `Register VM ${opts.register.vm} with xscontainer`,
            run: async (ctx: StageContext) => {
              registered = await registerStage(ctx, opts.register!, { id: imported.imageId!, ...(verified.tag ? { tag: verified.tag } : {}) });
            },
          },
        ]
      : []),
  ];

  try {
    const stages = await runSteps(steps, { engine: opts.engine, signal: controller.signal, cleanup, workdir, abort }, opts.renderer ?? 'auto');
    failed = false;
    return {
      image: imported.imageId ? { id: imported.imageId, tag: verified.tag ?? null } : null,
      output: formatOutput(output),
      ...(imported.path ? { path: imported.path } : {}),
      diffId: imported.diffId,
      files: imported.files,
      bytes: imported.bytes,
      engine: opts.engine,
      source: { name: fetched.name, sha256: fetched.sha256, size: fetched.size, kind, ...(fetched.url ? { url: fetched.url } : {}) },
      ...(extracted ? { ova: { ...(extracted.ova.label ? { label: extracted.ova.label } : {}), vdiSize: extracted.ova.rootVdi.size, chunks: extracted.chunks.map((c) => c.index) } } : {}),
      partition: { index: root.index, offset: root.offset, size: root.size },
      ...(verified.smokeOutput !== undefined ? { smoke: verified.smokeOutput } : {}),
      ...(registered ? { registered } : {}),
      ...(opts.keepWorkdir ? { workdir } : {}),
      stages,
    };
  } catch (err) {
    abort(err);
    layer?.stream.destroy();
    throw controller.signal.aborted && opts.signal?.aborted ? new CancelledError() : (firstError ?? err);
  } finally {
    opts.signal?.removeEventListener('abort', onOuterAbort);
    const problems = await cleanup.run(failed);
    if (problems.length) process.stderr.write(`ddk2docker: cleanup: ${problems.join('; ')}\n`);
  }
}

/** Rejects when the run is aborted; marked handled, since it usually loses the race it is in. */
function rejectOnAbort(signal: AbortSignal): Promise<never> {
  const p = new Promise<never>((_, reject) => {
    if (signal.aborted) reject(signal.reason);
    signal.addEventListener('abort', () => reject(signal.reason), { once: true });
  });
  p.catch(() => undefined);
  return p;
}
