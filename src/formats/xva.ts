import { XMLParser, XMLValidator } from 'fast-xml-parser';
import { InputError } from '../errors.js';

/**
 * XVA version 1 ("Zurich" directory-style appliance, what a DDK ISO carries): ova.xml and the
 * chunk layout of each VDI directory. Decompressing the chunks is the pipeline's job.
 */

/** Chunk N holds bytes [N × CHUNK_SIZE, (N + 1) × CHUNK_SIZE) of the disk: 1 GB, not 1 GiB. */
export const CHUNK_SIZE = 1_000_000_000;

/** The only disk encoding XVA version 1 defines. */
export const VDI_TYPE = 'dir-gzipped-chunks';

export interface OvaVdi {
  name: string;
  /** Disk size in bytes, as declared. */
  size: number;
  /** As written, e.g. "file://xvda". */
  source: string;
  /** The chunk directory named by source, relative to ova.xml's directory, e.g. "xvda". */
  directory: string;
  type: string;
  variety?: string;
}

export interface OvaVbd {
  device: string;
  vdi: string;
  function?: string;
}

export interface OvaInfo {
  version: 1;
  vmName: string;
  label: string;
  vdis: OvaVdi[];
  vbds: OvaVbd[];
  /** The VDI behind the vbd with device "xvda", else behind the one with function "root". */
  rootVdi: OvaVdi;
}

export interface ChunkPlacement {
  index: number;
  name: string;
  /** Where the chunk's decompressed bytes start in the disk: index × CHUNK_SIZE. */
  offset: number;
}

type XmlNode = Record<string, unknown>;

const REPEATED = new Set(['vm', 'vbd', 'vdi']);

const parser = new XMLParser({
  ignoreAttributes: false,
  attributeNamePrefix: '@_',
  // Values stay text: a label "6.5" must not become a number, sizes are checked by us.
  parseTagValue: false,
  parseAttributeValue: false,
  trimValues: true,
  isArray: (name, _jpath, _isLeaf, isAttribute) => !isAttribute && REPEATED.has(name),
});

function isNode(value: unknown): value is XmlNode {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function text(value: unknown): string {
  if (typeof value === 'string') return value;
  if (isNode(value) && typeof value['#text'] === 'string') return value['#text'];
  return '';
}

function attribute(node: XmlNode, name: string): string | undefined {
  const value = node[`@_${name}`];
  return typeof value === 'string' ? value : undefined;
}

function nodes(parent: XmlNode, name: string): XmlNode[] {
  const value = parent[name];
  if (value === undefined) return [];
  // A self-closing element with no attributes parses as ''; it is still an element.
  return (value as unknown[]).map((v) => (isNode(v) ? v : {}));
}

function parseSize(raw: string | undefined, vdi: string, input: string): number {
  if (raw === undefined) throw new InputError(input, `<vdi name="${vdi}"> has no size attribute`);
  if (!/^[0-9]+$/.test(raw.trim())) throw new InputError(input, `<vdi name="${vdi}"> size ${JSON.stringify(raw)} is not a number of bytes`);
  const size = BigInt(raw.trim());
  if (size === 0n || size > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new InputError(input, `<vdi name="${vdi}"> size ${raw.trim()} is not between 1 and ${Number.MAX_SAFE_INTEGER} bytes`);
  }
  return Number(size);
}

function parseDirectory(source: string | undefined, vdi: string, input: string): string {
  const m = source === undefined ? null : /^file:\/\/(.+)$/.exec(source);
  const directory = m?.[1];
  // The directory is joined to paths inside the image: one name, nothing that climbs out.
  if (directory === undefined || directory === '.' || directory === '..' || /[/\\\0]/.test(directory)) {
    throw new InputError(input, `<vdi name="${vdi}"> source ${JSON.stringify(source ?? '')} is not file://NAME (a directory next to ova.xml)`);
  }
  return directory;
}

/** Parse and check an XVA version 1 ova.xml; `input` names it in errors. */
export function parseOvaXml(xml: string | Buffer, input: string): OvaInfo {
  const doc = (typeof xml === 'string' ? xml : xml.toString('utf8')).replace(/^\uFEFF/, '');
  const valid = XMLValidator.validate(doc);
  if (valid !== true) {
    throw new InputError(input, `malformed XML at line ${valid.err.line}, column ${valid.err.col}: ${valid.err.msg}`);
  }
  let parsed: XmlNode;
  try {
    parsed = parser.parse(doc) as XmlNode;
  } catch (err) {
    throw new InputError(input, `malformed XML: ${(err as Error).message}`, { cause: err });
  }
  const appliance = parsed['appliance'];
  if (appliance === undefined) throw new InputError(input, 'no <appliance> element: not an XVA version 1 ova.xml');
  const app = isNode(appliance) ? appliance : {};

  const vms = nodes(app, 'vm');
  if (vms.length !== 1) throw new InputError(input, `expected one <vm> in <appliance>, found ${vms.length}`);
  const vm = vms[0]!;

  const vbds: OvaVbd[] = nodes(vm, 'vbd').map((node, i) => {
    const device = attribute(node, 'device');
    const vdi = attribute(node, 'vdi');
    if (!device || !vdi) throw new InputError(input, `<vbd> number ${i + 1} lacks a device or vdi attribute`);
    const fn = attribute(node, 'function');
    return fn === undefined ? { device, vdi } : { device, vdi, function: fn };
  });

  const vdis: OvaVdi[] = [];
  for (const node of nodes(app, 'vdi')) {
    const name = attribute(node, 'name');
    if (!name) throw new InputError(input, `<vdi> number ${vdis.length + 1} has no name attribute`);
    if (vdis.some((v) => v.name === name)) throw new InputError(input, `two <vdi> elements are named ${JSON.stringify(name)}`);
    const type = attribute(node, 'type');
    if (type !== VDI_TYPE) {
      throw new InputError(input, `<vdi name="${name}"> has type ${JSON.stringify(type ?? '')}; XVA version 1 disks are "${VDI_TYPE}"`);
    }
    const source = attribute(node, 'source') ?? '';
    const vdi: OvaVdi = {
      name,
      size: parseSize(attribute(node, 'size'), name, input),
      source,
      directory: parseDirectory(source, name, input),
      type,
    };
    const variety = attribute(node, 'variety');
    if (variety !== undefined) vdi.variety = variety;
    vdis.push(vdi);
  }
  if (vdis.length === 0) throw new InputError(input, 'no <vdi> element: the appliance has no disk');

  for (const vbd of vbds) {
    if (!vdis.some((v) => v.name === vbd.vdi)) throw new InputError(input, `<vbd device="${vbd.device}"> refers to a missing <vdi name="${vbd.vdi}">`);
  }
  const roots = vbds.filter((v) => v.function === 'root');
  const rootVbd = vbds.find((v) => v.device === 'xvda') ?? (roots.length === 1 ? roots[0] : undefined);
  if (!rootVbd) {
    throw new InputError(input, roots.length > 1 ? 'several <vbd function="root">, and none is xvda' : 'no <vbd> with device "xvda" or function "root": no root disk');
  }

  return {
    version: 1,
    vmName: attribute(vm, 'name') ?? '',
    label: text(vm['label']),
    vdis,
    vbds,
    rootVdi: vdis.find((v) => v.name === rootVbd.vdi)!,
  };
}

const CHUNK_NAME = /^chunk-([0-9]{9})\.gz$/i;
const MAX_LISTED = 10;

function listNames(names: string[]): string {
  const shown = names.slice(0, MAX_LISTED).map((n) => JSON.stringify(n)).join(', ');
  return names.length > MAX_LISTED ? `${shown} and ${names.length - MAX_LISTED} more` : shown;
}

/**
 * Place the chunk files of a VDI directory. `names` is the directory listing: names starting
 * with "chunk" (any case) must be chunk-NNNNNNNNN.gz, as xapi takes every "chunk-" file for a
 * chunk; anything else (TRANS.TBL, checksum lists) is not part of the disk and is ignored.
 * Numbers left out are holes of zeros, so placements carry their offsets. A chunk may start
 * at most one chunk past the declared size: the stream may be a container (a VHD) that is
 * slightly larger than the disk it holds.
 */
export function chunkLayout(names: string[], vdiSize: number, input: string): ChunkPlacement[] {
  if (!Number.isSafeInteger(vdiSize) || vdiSize <= 0) throw new InputError(input, `disk size ${vdiSize} is not a positive number of bytes`);
  const bad: string[] = [];
  const byIndex = new Map<number, string>();
  const duplicates: string[] = [];
  for (const name of names) {
    const m = CHUNK_NAME.exec(name);
    if (!m) {
      if (/^chunk/i.test(name)) bad.push(name);
      continue;
    }
    const index = Number(m[1]);
    const other = byIndex.get(index);
    if (other !== undefined) duplicates.push(`${JSON.stringify(other)} and ${JSON.stringify(name)}`);
    else byIndex.set(index, name);
  }
  if (bad.length > 0) throw new InputError(input, `bad chunk file names (expected chunk-NNNNNNNNN.gz): ${listNames(bad)}`);
  if (duplicates.length > 0) throw new InputError(input, `duplicate chunk numbers: ${duplicates.slice(0, MAX_LISTED).join('; ')}`);
  if (byIndex.size === 0) throw new InputError(input, 'no chunk files (chunk-NNNNNNNNN.gz)');

  const layout = [...byIndex].map(([index, name]) => ({ index, name, offset: index * CHUNK_SIZE })).sort((a, b) => a.index - b.index);
  const beyond = layout.filter((c) => c.offset >= vdiSize + CHUNK_SIZE);
  if (beyond.length > 0) {
    throw new InputError(input, `chunks start beyond the ${vdiSize}-byte disk declared in ova.xml: ${listNames(beyond.map((c) => `${c.name} at byte ${c.offset}`))}`);
  }
  return layout;
}
