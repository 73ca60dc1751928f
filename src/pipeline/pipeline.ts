import envPaths from 'env-paths';
import { recordConversion, warnCatalogue } from '../catalogue.js';
import { InputError } from '../errors.js';
import { parseTag, type Architecture } from '../docker/image.js';
import type { LibvirtLxcResult } from '../docker/libvirt.js';
import { formatOutput, parseOutput, preflightOutput } from '../docker/outputs.js';
import { assertHostEngineUsable } from '../host/facilities.js';
import { VERSION } from '../version.js';
import { checkXapiSettings } from '../xapi/index.js';
import { DiskState, diskSteps } from './disk.js';
import { exportRoot, type Layer } from './export.js';
import { normalizeSha256 } from './fetch.js';
import { importStage, type ImageSpec, type Imported } from './import.js';
import type { PartitionChoice } from './map.js';
import { describeProbe, FIT_LABELS, imageFit, type ImageFit } from './probe.js';
import { Push, type Pushed } from './push.js';
import { registerStage, type RegisterOptions, type Registered } from './register.js';
import type { RendererKind, StageTiming, Step } from './runner.js';
import { Handoff, rejectOnAbort, runScoped, type Scope } from './scope.js';
import type { Engine, StageContext } from './stage.js';
import { unameShimFile } from './uname-shim.js';
import { verify, type Verified } from './verify.js';
import { xvaSummary, type XvaSummary } from './xva.js';

export interface ConvertOptions {
  source: string;
  tag?: string;
  engine: Engine;
  output: string;
  sha256?: string;
  partition: PartitionChoice;
  changes: string[];
  labels: Record<string, string>;
  /** A command that must succeed in a container; false: none (default: see verify). */
  smoke?: string | false;
  workdir?: string;
  keepWorkdir?: boolean;
  cacheDir?: string;
  /** Overrides the platform detected from the tree's ELF binaries. */
  architecture?: Architecture;
  /** Add /usr/local/bin/uname reporting the DDK's kernel (see uname-shim.ts). */
  unameShim?: boolean;
  renderer?: RendererKind;
  register?: RegisterOptions;
  /** REGISTRY/REPO:TAG to push the image to once verified (credentials: REGISTRY_USER / REGISTRY_PASSWORD). */
  push?: string;
  /** Allow HTTPS without certificate checks, or HTTP, to the push registry (loopback always is). */
  pushInsecure?: boolean;
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
  /** An XVA version 2 source: the root disk's VDI and its blocks. */
  xva?: XvaSummary;
  partition: { index: number; offset: number; size: number };
  /** The image's platform, "linux/386" or "linux/amd64". */
  platform?: string;
  /** The Dom0 kernel version found in the tree. */
  kernel?: string;
  /** First line of /etc/redhat-release (else os-release's PRETTY_NAME). */
  release?: string;
  smoke?: string;
  registered?: Registered;
  pushed?: Pushed;
  /** --output libvirt-lxc:DIR: the domain XML, and what the tree could not keep. */
  libvirt?: LibvirtLxcResult;
  workdir?: string;
  stages: StageTiming[];
}

export const LABELS = {
  sourceName: 'ddk2docker.source.name',
  sourceSha256: 'ddk2docker.source.sha256',
  ovaLabel: 'ddk2docker.ova.label',
  version: 'ddk2docker.version',
  ...FIT_LABELS,
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
  await preflightOutput(output);
  const push = opts.push ? await Push.connect({ ref: opts.push, ...(opts.pushInsecure ? { insecure: true } : {}) }, opts.signal) : undefined;

  const d = new DiskState();
  let layer: Layer | undefined;
  const exportedLayer = new Handoff<Layer>();
  let imported!: Imported;
  let verified: Verified = {};
  let registered: Registered | undefined;
  let spec: ImageSpec | undefined;
  let pushed: Pushed | undefined;
  const labels: Record<string, string> = {};
  let fit: ImageFit | undefined;

  const build = (scope: Scope): Step[] => [
    ...diskSteps(d, { source: opts.source, cacheDir: opts.cacheDir ?? defaultCacheDir(), partition: opts.partition, ...(opts.sha256 ? { sha256: opts.sha256 } : {}) }, { engine: opts.engine, stages: [
      {
        name: 'export',
        title: 'Export root file system',
        run: async (ctx) => {
          await d.ready.root.get(ctx.signal);
          layer = await exportRoot(ctx, d.root, {
            input: d.fetched.name,
            extra: (probe) => {
              fit = imageFit(probe, { input: d.fetched.name, changes: opts.changes, unameShim: Boolean(opts.unameShim), ...(opts.architecture ? { architecture: opts.architecture } : {}) });
              ctx.note(describeProbe(probe, fit.architecture));
              return opts.unameShim ? [unameShimFile(probe, fit.architecture, d.fetched.name)] : [];
            },
          });
          layer.stream = d.untilWhole(layer.stream, ctx.signal);
          exportedLayer.set(push ? push.tap(layer) : layer);
          await Promise.race([layer.done, rejectOnAbort(ctx.signal)]);
        },
      },
      {
        name: 'import',
        title: output.kind === 'docker' ? 'Import into Docker' : `Write ${formatOutput(output)}`,
        run: async (ctx) => {
          // The layer comes after the probe: the platform, kernel and release are known by then.
          const exported = await exportedLayer.get(scope.signal);
          await d.ready.verified.get(ctx.signal);
          Object.assign(labels, {
            [LABELS.sourceName]: d.fetched.name,
            [LABELS.sourceSha256]: d.fetched.sha256,
            ...(d.extracted?.ova.label ? { [LABELS.ovaLabel]: d.extracted.ova.label } : {}),
            ...(d.xva?.ova.vmName ? { [LABELS.ovaLabel]: d.xva.ova.vmName } : {}),
            [LABELS.version]: VERSION,
            ...fit!.labels,
            ...opts.labels,
          });
          spec = {
            changes: [...fit!.changes, ...opts.changes],
            labels,
            architecture: fit!.architecture,
            ...(opts.tag ? { tag: opts.tag } : {}),
            message: `ddk2docker ${VERSION} from ${d.fetched.name}`,
          };
          imported = await importStage(ctx, exported, output, spec);
        },
      },
      ...(push ? [{ name: 'upload' as const, title: `Upload layer to ${push.ref}`, run: (ctx: StageContext) => push.upload(ctx) }] : []),
    ] }),
    {
      name: 'verify',
      title: 'Verify',
      run: async (ctx) => {
        verified = await verify(ctx, imported, { ...(opts.smoke !== undefined ? { smoke: opts.smoke } : {}), labels, ...(opts.tag ? { tag: opts.tag } : {}) });
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
    // Last: the tag appears in the registry only when everything else has succeeded.
    ...(push ? [{ name: 'push' as const, title: `Push ${push.ref}`, run: async (ctx: StageContext) => void (pushed = await push.publish(ctx, imported, spec!)) }] : []),
  ];

  try {
    const { stages, workdir } = await runScoped(opts, build);
    const result: ConvertResult = {
      image: imported.imageId ? { id: imported.imageId, tag: verified.tag ?? null } : null,
      output: formatOutput(output),
      ...(imported.path ? { path: imported.path } : {}),
      diffId: imported.diffId,
      files: imported.files,
      bytes: imported.bytes,
      engine: opts.engine,
      source: { name: d.fetched.name, sha256: d.fetched.sha256, size: d.fetched.size, kind: d.kind, ...(d.fetched.url ? { url: d.fetched.url } : {}) },
      ...(d.extracted ? { ova: { ...(d.extracted.ova.label ? { label: d.extracted.ova.label } : {}), vdiSize: d.extracted.ova.rootVdi.size, chunks: d.extracted.chunks.map((c) => c.index) } } : {}),
      ...(d.xva ? { xva: xvaSummary(d.xva) } : {}),
      partition: { index: d.root.index, offset: d.root.offset, size: d.root.size },
      ...(fit ? { platform: fit.platform, ...(fit.kernel ? { kernel: fit.kernel } : {}), ...(fit.release ? { release: fit.release } : {}) } : {}),
      ...(verified.smokeOutput !== undefined ? { smoke: verified.smokeOutput } : {}),
      ...(registered ? { registered } : {}),
      ...(pushed ? { pushed } : {}),
      ...(imported.libvirt ? { libvirt: imported.libvirt } : {}),
      ...(opts.keepWorkdir ? { workdir } : {}),
      stages,
    };
    // Only a finished conversion is recorded; the catalogue is bookkeeping and cannot undo it.
    await recordConversion(result).catch(warnCatalogue);
    return result;
  } finally {
    layer?.stream.destroy();
  }
}
