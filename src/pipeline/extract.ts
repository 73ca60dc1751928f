import { Readable } from 'node:stream';
import { InputError } from '../errors.js';
import { chunkLayout, parseOvaXml, type OvaInfo } from '../formats/xva.js';
import { Iso9660 } from '../formats/iso9660.js';
import { FileSource, type Source } from '../formats/source.js';
import { openHostIso, type HostIso } from '../host/iso.js';
import { isoMethod, probeFacilities } from '../host/facilities.js';
import type { StageContext } from './stage.js';

/** Where a chunk's bytes lie in a local file: these byte ranges of `path`, concatenated. */
export interface ChunkLocation {
  path: string;
  extents: { offset: number; length: number }[];
}

/** extract: find ova.xml and the disk's chunk files inside the ISO. */
export interface Chunk {
  index: number;
  name: string;
  /** Where its decompressed bytes start in the disk stream. */
  offset: number;
  /** A path to read it from, when the ISO is mounted. */
  path?: string;
  /** Its bytes inside the ISO file, for readers that take them from there themselves. */
  location?: ChunkLocation;
  open(): Readable;
}

export interface Extracted {
  ova: OvaInfo;
  /** Directory of the chunks inside the ISO, e.g. "ddk/xvda". */
  chunkDir: string;
  chunks: Chunk[];
}

const OVA_CANDIDATES = ['ddk/ova.xml', 'ova.xml'];

/** ova.xml names the chunk directory as source="file://xvda", relative to ova.xml's own directory. */
function chunkDirOf(ovaPath: string, source: string): string {
  const dir = ovaPath.includes('/') ? ovaPath.slice(0, ovaPath.lastIndexOf('/')) : '';
  const rel = source.replace(/^file:\/\//, '');
  if (!/^[A-Za-z0-9._-]+$/.test(rel) || rel === '.' || rel === '..') throw new InputError('ova.xml', `VDI source ${JSON.stringify(source)} is not a plain directory name`);
  return dir ? `${dir}/${rel}` : rel;
}

interface IsoAccess {
  list(dir: string): Promise<string[]>;
  readFile(path: string): Promise<Buffer>;
  open(path: string): Readable;
  pathOf?(p: string): string | undefined;
  locate?(p: string): Promise<ChunkLocation>;
}

async function locate(iso: IsoAccess, isoName: string): Promise<Extracted> {
  let ovaPath: string | undefined;
  for (const candidate of OVA_CANDIDATES) {
    const dir = candidate.includes('/') ? candidate.slice(0, candidate.lastIndexOf('/')) : '';
    if ((await iso.list(dir)).includes(candidate.slice(candidate.lastIndexOf('/') + 1))) {
      ovaPath = candidate;
      break;
    }
  }
  if (!ovaPath) throw new InputError(isoName, 'no ddk/ova.xml in the ISO: not a DDK ISO');
  const ovaXml = (await iso.readFile(ovaPath)).toString('utf8');
  const ova = parseOvaXml(ovaXml, `${isoName}:${ovaPath}`);
  const chunkDir = chunkDirOf(ovaPath, ova.rootVdi.source);
  const names = await iso.list(chunkDir);
  if (names.length === 0) throw new InputError(isoName, `no chunk files in ${chunkDir}/`);
  const layout = chunkLayout(names, ova.rootVdi.size, `${isoName}:${chunkDir}`);
  const chunks: Chunk[] = [];
  for (const c of layout) {
    const p = `${chunkDir}/${c.name}`;
    chunks.push({ index: c.index, name: c.name, offset: c.offset, path: iso.pathOf?.(p), location: await iso.locate?.(p), open: () => iso.open(p) });
  }
  return { ova, chunkDir, chunks };
}

async function builtinAccess(ctx: StageContext, isoPath: string, isoName: string): Promise<IsoAccess> {
  const src = await FileSource.open(isoPath, isoName);
  ctx.cleanup.defer(`close ${isoName}`, () => src.close());
  const iso = await Iso9660.open(src);
  const entry = async (p: string) => {
    const e = await iso.lookup(p);
    if (!e) throw new InputError(isoName, `no ${p} in the ISO`);
    return e;
  };
  return {
    list: async (d) => {
      const dir = await iso.lookup(d);
      return dir?.isDirectory ? (await iso.list(dir)).map((e) => e.name) : [];
    },
    readFile: async (p) => {
      const e = await entry(p);
      const file = iso.open(e);
      return file.read(0, file.size);
    },
    open: (p) => Readable.from(readAll(async () => iso.open(await entry(p))), { objectMode: false }),
    locate: async (p) => ({ path: isoPath, extents: (await entry(p)).extents.map((e) => ({ offset: e.offset, length: e.length })) }),
  };
}

/** A file of the ISO as bytes, read in 1 MiB pieces. */
async function* readAll(open: () => Promise<Source>): AsyncGenerator<Buffer> {
  const src = await open();
  for (let pos = 0; pos < src.size; ) {
    const n = Math.min(1 << 20, src.size - pos);
    yield await src.read(pos, n);
    pos += n;
  }
}

export async function extract(ctx: StageContext, isoPath: string, isoName: string): Promise<Extracted> {
  if (ctx.engine === 'builtin') return locate(await builtinAccess(ctx, isoPath, isoName), isoName);
  const { method, why } = isoMethod(await probeFacilities());
  if (!method) throw new InputError(isoName, `the host engine cannot read the ISO here: ${why}`);
  if (method !== 'kernel') ctx.note(why);
  const iso: HostIso = await openHostIso(isoPath, method, ctx);
  return locate(iso, isoName);
}
