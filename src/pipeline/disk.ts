import { InputError } from '../errors.js';
import { detectSource, type SourceKind } from '../formats/detect.js';
import { FileSource } from '../formats/source.js';
import { convert, type RawDisk } from './convert.js';
import { decompress } from './decompress.js';
import { extract, type Extracted } from './extract.js';
import { fetchSource, type FetchedSource } from './fetch.js';
import { mapRoot, type MappedRoot, type PartitionChoice } from './map.js';
import type { StageSpec } from './runner.js';

/** What the first five stages find: the source, its chunks, the raw disk and the root partition. */
export class DiskState {
  fetched!: FetchedSource;
  kind: SourceKind = 'unknown';
  extracted: Extracted | undefined;
  disk!: { path: string; name: string; owned: boolean };
  raw!: RawDisk;
  root!: MappedRoot;
}

export interface DiskOptions {
  source: string;
  sha256?: string;
  cacheDir: string;
  partition: PartitionChoice;
}

/** fetch → extract → decompress → convert → map, shared by convert and inspect. */
export function diskSteps(s: DiskState, opts: DiskOptions): StageSpec[] {
  return [
    {
      name: 'fetch',
      title: `Fetch ${opts.source}`,
      run: async (ctx) => {
        s.fetched = await fetchSource(ctx, opts.source, { cacheDir: opts.cacheDir, ...(opts.sha256 ? { sha256: opts.sha256 } : {}) });
        const src = await FileSource.open(s.fetched.path, s.fetched.name);
        try {
          s.kind = await detectSource(src);
        } finally {
          await src.close();
        }
        if (s.kind === 'unknown') throw new InputError(s.fetched.name, 'not a DDK ISO, XVA, VHD or disk image (no ISO 9660 volume descriptor, VHD footer, partition table or ext superblock)');
        if (s.kind === 'xva') throw new InputError(s.fetched.name, 'XVA (version 2) input is not supported yet');
        if (s.kind !== 'iso') s.disk = { path: s.fetched.path, name: s.fetched.name, owned: false };
      },
    },
    {
      name: 'extract',
      title: 'Extract ova.xml and chunks',
      run: async (ctx) => {
        if (s.kind !== 'iso') return;
        s.extracted = await extract(ctx, s.fetched.path, s.fetched.name);
        ctx.note(`${s.extracted.ova.label || 'unnamed VM'}: ${s.extracted.ova.rootVdi.size} bytes in ${s.extracted.chunks.length} chunks`);
      },
    },
    {
      name: 'decompress',
      title: 'Decompress chunks',
      run: async (ctx) => {
        if (!s.extracted) return;
        const d = await decompress(ctx, s.extracted, s.fetched.name);
        s.disk = { path: d.path, name: `${s.fetched.name}:${s.extracted.chunkDir}`, owned: true };
      },
    },
    {
      name: 'convert',
      title: 'Convert to raw',
      run: async (ctx) => {
        s.raw = await convert(ctx, s.disk, s.extracted?.ova.rootVdi.size);
      },
    },
    {
      name: 'map',
      title: 'Map root partition',
      run: async (ctx) => {
        s.root = await mapRoot(ctx, s.raw, s.disk.name, opts.partition);
      },
    },
  ];
}
