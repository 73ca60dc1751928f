import { Transform, type Readable } from 'node:stream';
import { InputError } from '../errors.js';
import { detectSource, type SourceKind } from '../formats/detect.js';
import type { GrowingFile } from '../formats/growing.js';
import { FileSource, type Source } from '../formats/source.js';
import { refuseCompressedXva, type OpenedXva } from '../formats/xva2.js';
import { convert, type RawDisk } from './convert.js';
import { decompress, startDecompress } from './decompress.js';
import { extract, type Extracted } from './extract.js';
import { fetchSource, type FetchedSource } from './fetch.js';
import { mapRoot, type MappedRoot, type PartitionChoice } from './map.js';
import type { StageSpec, Step } from './runner.js';
import { Handoff } from './scope.js';
import type { Engine } from './stage.js';
import { extractXva, xvaDisk } from './xva.js';

/** What the first five stages find: the source, its chunks, the raw disk and the root partition. */
export class DiskState {
  fetched!: FetchedSource;
  kind: SourceKind = 'unknown';
  extracted: Extracted | undefined;
  /** An XVA version 2 source, indexed in place. */
  xva: OpenedXva | undefined;
  /** The disk stream: a file, or a Source read in place (an XVA's disk, builtin engine). */
  disk!: { path: string; name: string; owned: boolean; source?: Source; growing?: { file: GrowingFile; size: number } };
  raw!: RawDisk;
  root!: MappedRoot;
  /**
   * When the stages run at once (builtin engine), each settles once its stage has set the field
   * above; `fetched` may come before `verified` (the sha256 of a local file, then in `fetched`).
   */
  readonly ready = { fetched: new Handoff<void>(), verified: new Handoff<void>(), extracted: new Handoff<void>(), disk: new Handoff<void>(), raw: new Handoff<void>(), root: new Handoff<void>() };
  /** Settles when the disk is whole: decompress has written and checked every chunk. */
  readonly whole = new Handoff<void>();
  /** The builtin engine's decompress, while the disk is read as it is written. */
  decompressing: Promise<void> | undefined;

  /**
   * What to report for a stage that failed on the disk's contents: a reader of the disk while it
   * is decompressed can meet a chunk's corrupt bytes before the chunk's own check does (its CRC
   * comes at its end), and its complaint about a directory or a partition table is then only a
   * symptom. The decompress is let finish, and its own failure, the cause, is reported instead.
   */
  async causeOf(err: unknown): Promise<unknown> {
    if (!(err instanceof InputError) || !this.decompressing) return err;
    const failure = await this.decompressing.then(() => undefined, (e: unknown) => e);
    return failure instanceof InputError ? failure : err;
  }

  /**
   * The layer, ending only once the disk is whole: read while the disk is decompressed, it could
   * otherwise be complete (an output renamed into place, an image made) before a chunk it never
   * read turns out corrupt.
   */
  untilWhole(layer: Readable, signal: AbortSignal): Readable {
    const gated = new Transform({
      highWaterMark: 1 << 20,
      transform: (chunk: Buffer, _enc, cb) => cb(null, chunk),
      flush: (cb) => void this.whole.get(signal).then(() => cb(), cb),
    });
    layer.once('error', (err) => gated.destroy(err));
    // The import stage may not read it yet (waiting for the daemon) when an interrupt fails the
    // layer: unheard, that error would crash the process before its cleanup. The run learns of it
    // through the layer's `done`, and a later reader through the destroyed stream.
    gated.on('error', () => undefined);
    gated.once('close', () => layer.destroy());
    return layer.pipe(gated);
  }
}

export interface DiskOptions {
  source: string;
  sha256?: string;
  cacheDir: string;
  partition: PartitionChoice;
}

/**
 * fetch → extract → decompress → convert → map, shared by convert and inspect, then the stages
 * `then` brings (export, import), which run at once. With the builtin engine all of them run at
 * once, each waiting for what it needs (DiskState.ready): export reads the disk while it is being
 * decompressed. The host engine keeps the manual recipe's order.
 */
export function diskSteps(s: DiskState, opts: DiskOptions, then?: { engine: Engine; stages: StageSpec[] }): Step[] {
  const stages: StageSpec[] = [
    {
      name: 'fetch',
      title: `Fetch ${opts.source}`,
      run: async (ctx) => {
        const detect = async (file: { path: string; name: string }) => {
          const src = await FileSource.open(file.path, file.name);
          try {
            s.kind = await detectSource(src);
            if (s.kind === 'unknown') await refuseCompressedXva(src);
          } finally {
            await src.close();
          }
        };
        // Running at once, the next stages start on a local file while it is hashed; only the
        // labels (import) wait for the sha256. An unknown kind is reported after the hash, so a
        // sha256 mismatch is what a wrong file is told first.
        const whileHashing = async (file: Omit<FetchedSource, 'sha256'>) => {
          await detect(file);
          if (s.kind === 'unknown') return;
          s.fetched = { ...file, sha256: '' };
          if (s.kind !== 'iso' && s.kind !== 'xva') s.disk = { path: file.path, name: file.name, owned: false };
          s.ready.fetched.set();
        };
        s.fetched = await fetchSource(ctx, opts.source, { cacheDir: opts.cacheDir, ...(opts.sha256 ? { sha256: opts.sha256 } : {}), ...(then?.engine === 'builtin' ? { whileHashing } : {}) });
        if (s.kind === 'unknown') await detect(s.fetched);
        if (s.kind === 'unknown') throw new InputError(s.fetched.name, 'not a DDK ISO, XVA, VHD or disk image (no ISO 9660 volume descriptor, VHD footer, partition table or ext superblock)');
        if (s.kind !== 'iso' && s.kind !== 'xva') s.disk = { path: s.fetched.path, name: s.fetched.name, owned: false };
        s.ready.fetched.set();
        s.ready.verified.set();
      },
    },
    {
      name: 'extract',
      title: 'Extract ova.xml and chunks',
      run: async (ctx) => {
        await s.ready.fetched.get(ctx.signal);
        if (s.kind === 'xva') {
          s.xva = await extractXva(ctx, s.fetched.path, s.fetched.name);
          const { ova, layout } = s.xva;
          ctx.note(`${ova.vmName || 'unnamed VM'}: ${ova.rootVdi.id}, ${ova.rootVdi.virtualSize} bytes in ${layout.blocks.length - layout.keepAlive} blocks (${layout.checksums.join(', ')})`);
        } else if (s.kind === 'iso') {
          s.extracted = await extract(ctx, s.fetched.path, s.fetched.name);
          ctx.note(`${s.extracted.ova.label || 'unnamed VM'}: ${s.extracted.ova.rootVdi.size} bytes in ${s.extracted.chunks.length} chunks`);
        }
        s.ready.extracted.set();
      },
    },
    {
      name: 'decompress',
      title: 'Decompress chunks',
      run: async (ctx) => {
        await s.ready.extracted.get(ctx.signal);
        if (s.xva) s.disk = await xvaDisk(ctx, s.xva, s.fetched.path);
        if (s.extracted) {
          const name = `${s.fetched.name}:${s.extracted.chunkDir}`;
          if (ctx.engine === 'builtin') {
            // The disk is handed on as soon as its length is known; readers wait for the bytes they need.
            const d = await startDecompress(ctx, s.extracted, s.fetched.name);
            s.decompressing = d.done;
            s.disk = { path: d.path, name, owned: true, growing: { file: d.file, size: await d.streamSize } };
            s.ready.disk.set();
            await d.done;
          } else {
            s.disk = { path: (await decompress(ctx, s.extracted, s.fetched.name)).path, name, owned: true };
          }
        }
        s.ready.disk.set();
        s.whole.set();
      },
    },
    {
      name: 'convert',
      title: 'Convert to raw',
      run: async (ctx) => {
        await s.ready.disk.get(ctx.signal);
        s.raw = await convert(ctx, s.disk, s.extracted?.ova.rootVdi.size ?? s.xva?.ova.rootVdi.virtualSize);
        s.ready.raw.set();
      },
    },
    {
      name: 'map',
      title: 'Map root partition',
      run: async (ctx) => {
        await s.ready.raw.get(ctx.signal);
        s.root = await mapRoot(ctx, s.raw, s.disk.name, opts.partition);
        s.ready.root.set();
      },
    },
  ];
  if (!then) return stages;
  return then.engine === 'builtin' ? [[...stages, ...then.stages].map((stage) => readingDisk(s, stage))] : [...stages, then.stages];
}

/** A stage whose failure may be a symptom of a corrupt chunk reports the cause (DiskState.causeOf). */
function readingDisk(s: DiskState, stage: StageSpec): StageSpec {
  if (stage.name === 'fetch' || stage.name === 'extract' || stage.name === 'decompress') return stage;
  return {
    ...stage,
    run: async (ctx) => {
      try {
        await stage.run(ctx);
      } catch (err) {
        throw await s.causeOf(err);
      }
    },
  };
}
