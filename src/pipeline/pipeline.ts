import envPaths from 'env-paths';
import { InputError } from '../errors.js';
import { parseTag, type Architecture } from '../docker/image.js';
import { formatOutput, parseOutput } from '../docker/outputs.js';
import { assertHostEngineUsable } from '../host/facilities.js';
import { VERSION } from '../version.js';
import { checkXapiSettings } from '../xapi/index.js';
import { DiskState, diskSteps } from './disk.js';
import { exportRoot, type Layer } from './export.js';
import { normalizeSha256 } from './fetch.js';
import { importStage, type Imported } from './import.js';
import type { PartitionChoice } from './map.js';
import { registerStage, type RegisterOptions, type Registered } from './register.js';
import type { RendererKind, StageTiming, Step } from './runner.js';
import { rejectOnAbort, runScoped, type Scope } from './scope.js';
import type { Engine, StageContext } from './stage.js';
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
  if (opts.register) checkXapiSettings({ xapi: opts.register.xapi });
  if (opts.engine === 'host') await assertHostEngineUsable();

  const d = new DiskState();
  let layer: Layer | undefined;
  let layerReady: (l: Layer) => void = () => {};
  const layerPromise = new Promise<Layer>((r) => (layerReady = r));
  let imported!: Imported;
  let verified: Verified = {};
  let registered: Registered | undefined;
  const labels: Record<string, string> = {};

  const build = (scope: Scope): Step[] => [
    ...diskSteps(d, { source: opts.source, cacheDir: opts.cacheDir ?? defaultCacheDir(), partition: opts.partition, ...(opts.sha256 ? { sha256: opts.sha256 } : {}) }),
    [
      {
        name: 'export',
        title: 'Export root file system',
        run: async (ctx) => {
          layer = await exportRoot(ctx, d.root);
          layerReady(layer);
          await Promise.race([layer.done, rejectOnAbort(ctx.signal)]);
        },
      },
      {
        name: 'import',
        title: output.kind === 'docker' ? 'Import into Docker' : `Write ${formatOutput(output)}`,
        run: async (ctx) => {
          Object.assign(labels, {
            [LABELS.sourceName]: d.fetched.name,
            [LABELS.sourceSha256]: d.fetched.sha256,
            ...(d.extracted?.ova.label ? { [LABELS.ovaLabel]: d.extracted.ova.label } : {}),
            [LABELS.version]: VERSION,
            ...opts.labels,
          });
          imported = await importStage(ctx, await Promise.race([layerPromise, rejectOnAbort(scope.signal)]), output, {
            changes: opts.changes,
            labels,
            architecture: opts.architecture ?? 'amd64',
            ...(opts.tag ? { tag: opts.tag } : {}),
            message: `ddk2docker ${VERSION} from ${d.fetched.name}`,
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
    const { stages, workdir } = await runScoped(opts, build);
    return {
      image: imported.imageId ? { id: imported.imageId, tag: verified.tag ?? null } : null,
      output: formatOutput(output),
      ...(imported.path ? { path: imported.path } : {}),
      diffId: imported.diffId,
      files: imported.files,
      bytes: imported.bytes,
      engine: opts.engine,
      source: { name: d.fetched.name, sha256: d.fetched.sha256, size: d.fetched.size, kind: d.kind, ...(d.fetched.url ? { url: d.fetched.url } : {}) },
      ...(d.extracted ? { ova: { ...(d.extracted.ova.label ? { label: d.extracted.ova.label } : {}), vdiSize: d.extracted.ova.rootVdi.size, chunks: d.extracted.chunks.map((c) => c.index) } } : {}),
      partition: { index: d.root.index, offset: d.root.offset, size: d.root.size },
      ...(verified.smokeOutput !== undefined ? { smoke: verified.smokeOutput } : {}),
      ...(registered ? { registered } : {}),
      ...(opts.keepWorkdir ? { workdir } : {}),
      stages,
    };
  } finally {
    layer?.stream.destroy();
  }
}
