import { mkdir, mkdtemp, readFile, rm, stat, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import xxhash from 'xxhash-wasm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InputError } from '../../src/errors.js';
import { FileSource, type Source } from '../../src/formats/source.js';
import { CHUNK_SIZE, chunkLayout, parseOvaXml } from '../../src/formats/xva.js';
import { BLOCK_SIZE, openXva, parseXvaOvaXml, refuseCompressedXva, type OpenedXva } from '../../src/formats/xva2.js';
import { expectInputError, patch } from '../helpers/bytes.js';

const DDK_65 = `<?xml version="1.0" ?>
<appliance version="0.1">
  <vm name="vm">
    <label>XenServer 6.5.0 DDK</label>
    <shortdesc>Driver Development Kit</shortdesc>
    <config mem_set="536870912" vcpus="1"/>
    <hacks is_hvm="false" kernel_boot_cmdline="root=/dev/xvda1 ro"/>
    <vbd device="xvda" function="root" mode="w" vdi="vdi_xvda"/>
  </vm>
  <vdi name="vdi_xvda" size="3500000000" source="file://xvda" type="dir-gzipped-chunks" variety="system"/>
</appliance>
`;

// As written by rPath rBuilder: non-empty <hacks>, sd* devices, a data disk, no variety.
const RBUILDER = `<?xml version="1.0" ?>
<appliance version="0.1">
        <vm name="vm">
            <label>Test Linux</label>
            <shortdesc>Created by rPath rBuilder</shortdesc>
            <config mem_set="0" vcpus="1"/>
            <hacks is_hvm="false" kernel_boot_cmdline="root=/dev/sda1 ro ">
            </hacks>
            <vbd device="sdb" mode="w" vdi="vdi_sdb"/>
            <vbd device="sda" function="root" mode="w" vdi="vdi_sda"/>
        </vm>
    <vdi name="vdi_sda" size="100" source="file://sda" type="dir-gzipped-chunks"/>
    <vdi name="vdi_sdb" size="200" source="file://sdb" type="dir-gzipped-chunks"/>
</appliance>
`;

function problem(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(InputError);
    return (err as Error).message;
  }
  throw new Error('no error thrown');
}

describe('parseOvaXml', () => {
  it('reads a DDK ova.xml', () => {
    const ova = parseOvaXml(DDK_65, 'ova.xml');
    expect(ova).toEqual({
      version: 1,
      vmName: 'vm',
      label: 'XenServer 6.5.0 DDK',
      vdis: [{ name: 'vdi_xvda', size: 3_500_000_000, source: 'file://xvda', directory: 'xvda', type: 'dir-gzipped-chunks', variety: 'system' }],
      vbds: [{ device: 'xvda', vdi: 'vdi_xvda', function: 'root' }],
      rootVdi: { name: 'vdi_xvda', size: 3_500_000_000, source: 'file://xvda', directory: 'xvda', type: 'dir-gzipped-chunks', variety: 'system' },
    });
  });

  it('accepts a Buffer with a byte order mark, entities and numeric-looking labels', () => {
    const xml = Buffer.from(`\uFEFF${DDK_65.replace('XenServer 6.5.0 DDK', '6.5').replace('name="vm"', 'name="a &amp; b"')}`);
    const ova = parseOvaXml(xml, 'ova.xml');
    expect(ova.label).toBe('6.5');
    expect(ova.vmName).toBe('a & b');
  });

  it('finds the root disk by function when there is no xvda', () => {
    const ova = parseOvaXml(RBUILDER, 'ova.xml');
    expect(ova.rootVdi.name).toBe('vdi_sda');
    expect(ova.rootVdi.directory).toBe('sda');
    expect(ova.rootVdi.variety).toBeUndefined();
    expect(ova.vdis.map((v) => v.size)).toEqual([100, 200]);
    expect(ova.vbds).toEqual([
      { device: 'sdb', vdi: 'vdi_sdb' },
      { device: 'sda', vdi: 'vdi_sda', function: 'root' },
    ]);
  });

  it('accepts sizes up to 2^53 - 1', () => {
    const ova = parseOvaXml(DDK_65.replace('3500000000', String(Number.MAX_SAFE_INTEGER)), 'ova.xml');
    expect(ova.rootVdi.size).toBe(Number.MAX_SAFE_INTEGER);
  });

  it.each([
    ['malformed XML', DDK_65.replace('</vm>', ''), /^ddk\.iso:ddk\/ova\.xml: malformed XML at line \d+/],
    ['not XML at all', 'PK\u0003\u0004 binary', /malformed XML|no <appliance>/],
    ['no appliance', '<?xml version="1.0"?><vm name="x"/>', /no <appliance> element/],
    ['no vm', '<appliance version="0.1"><vdi name="a" size="1" source="file://a" type="dir-gzipped-chunks"/></appliance>', /expected one <vm>.*found 0/],
    ['two vms', DDK_65.replace('<vm name="vm">', '<vm name="x"/><vm name="vm">'), /expected one <vm>.*found 2/],
    ['no vdi', DDK_65.replace(/<vdi [^>]*\/>/, ''), /no <vdi> element/],
    ['size not a number', DDK_65.replace('3500000000', '3.5e9'), /size "3\.5e9" is not a number of bytes/],
    ['negative size', DDK_65.replace('3500000000', '-1'), /is not a number of bytes/],
    ['zero size', DDK_65.replace('3500000000', '0'), /size 0 is not between 1 and/],
    ['size over 2^53', DDK_65.replace('3500000000', '9007199254740993'), /size 9007199254740993 is not between/],
    ['no size', DDK_65.replace('size="3500000000" ', ''), /has no size attribute/],
    ['unknown type', DDK_65.replace('dir-gzipped-chunks', 'vhd'), /type "vhd"; XVA version 1 disks are "dir-gzipped-chunks"/],
    ['no type', DDK_65.replace(' type="dir-gzipped-chunks"', ''), /type ""/],
    ['http source', DDK_65.replace('file://xvda', 'http://x/xvda'), /source "http:\/\/x\/xvda" is not file:\/\/NAME/],
    ['climbing source', DDK_65.replace('file://xvda', 'file://../etc'), /is not file:\/\/NAME/],
    ['nested source', DDK_65.replace('file://xvda', 'file://a/b'), /is not file:\/\/NAME/],
    ['dangling vbd', DDK_65.replace('vdi="vdi_xvda"', 'vdi="vdi_other"'), /refers to a missing <vdi name="vdi_other">/],
    ['vbd without vdi', DDK_65.replace(' vdi="vdi_xvda"', ''), /<vbd> number 1 lacks a device or vdi/],
    ['no root disk', DDK_65.replace('device="xvda" function="root"', 'device="xvdb"'), /no root disk/],
    ['duplicate vdi', DDK_65.replace('</appliance>', '<vdi name="vdi_xvda" size="1" source="file://y" type="dir-gzipped-chunks"/></appliance>'), /two <vdi> elements are named "vdi_xvda"/],
  ])('rejects %s', (_what, xml, pattern) => {
    expect(problem(() => parseOvaXml(xml, 'ddk.iso:ddk/ova.xml'))).toMatch(pattern);
  });

  it('rejects two root disks when neither is xvda', () => {
    expect(problem(() => parseOvaXml(RBUILDER.replace('device="sdb"', 'device="sdb" function="root"'), 'ova.xml'))).toMatch(/several <vbd function="root">/);
  });
});

describe('chunkLayout', () => {
  const name = (n: number) => `chunk-${String(n).padStart(9, '0')}.gz`;

  it('places chunks at N × 1e9, sorted, gaps left as gaps', () => {
    const layout = chunkLayout([name(3), name(0), 'TRANS.TBL', name(1), 'SHA1SUMS'], 3_500_000_000, 'xvda');
    expect(layout).toEqual([
      { index: 0, name: name(0), offset: 0 },
      { index: 1, name: name(1), offset: CHUNK_SIZE },
      { index: 3, name: name(3), offset: 3 * CHUNK_SIZE },
    ]);
    expect(CHUNK_SIZE).toBe(1_000_000_000);
  });

  it('accepts upper-case names (plain ISO 9660) and a chunk one past the declared size', () => {
    expect(chunkLayout(['CHUNK-000000000.GZ', name(4)], 3_500_000_000, 'xvda').map((c) => c.offset)).toEqual([0, 4 * CHUNK_SIZE]);
  });

  it('lists bad chunk names', () => {
    const msg = problem(() => chunkLayout([name(0), 'chunk-1.gz', 'chunk-0000000001.gz', 'chunk000000002.gz', 'chunk-000000003.gz.checksum'], 5e9, 'ddk.iso:ddk/xvda'));
    expect(msg).toBe(
      'ddk.iso:ddk/xvda: bad chunk file names (expected chunk-NNNNNNNNN.gz): "chunk-1.gz", "chunk-0000000001.gz", "chunk000000002.gz", "chunk-000000003.gz.checksum"',
    );
  });

  it('rejects duplicates', () => {
    expect(problem(() => chunkLayout([name(1), 'CHUNK-000000001.GZ'], 5e9, 'xvda'))).toMatch(/duplicate chunk numbers: "chunk-000000001\.gz" and "CHUNK-000000001\.GZ"/);
    expect(problem(() => chunkLayout([name(1), name(1)], 5e9, 'xvda'))).toMatch(/duplicate/);
  });

  it('rejects chunks starting beyond the declared size plus one chunk', () => {
    expect(problem(() => chunkLayout([name(0), name(5)], 3_500_000_000, 'xvda'))).toMatch(/chunk-000000005\.gz at byte 5000000000/);
    expect(problem(() => chunkLayout([name(999_999_999)], Number.MAX_SAFE_INTEGER, 'xvda'))).toMatch(/beyond the/);
  });

  it('rejects an empty directory and a bad size', () => {
    expect(problem(() => chunkLayout(['TRANS.TBL'], 5e9, 'xvda'))).toMatch(/no chunk files/);
    expect(problem(() => chunkLayout([name(0)], 0, 'xvda'))).toMatch(/not a positive number/);
    expect(problem(() => chunkLayout([name(0)], 1.5, 'xvda'))).toMatch(/not a positive number/);
  });
});

// ---------------------------------------------------------------------------------------------
// XVA version 2

/** An ova.xml as XAPI writes it (export.ml: a struct of version and objects), with a CD and a data disk. */
function xapiOvaXml(o: { rootUserdevice?: string; rootDevice?: string; rootBootable?: boolean; size?: string; extraVm?: boolean } = {}): string {
  const m = (name: string, value: string) => `<member><name>${name}</name><value>${value}</value></member>`;
  const obj = (cls: string, id: string, fields: string) => `<value><struct>${m('class', cls)}${m('id', id)}${m('snapshot', `<struct>${fields}</struct>`)}</struct></value>`;
  const bool = (b: boolean) => `<boolean>${b ? 1 : 0}</boolean>`;
  const vbd = (id: string, vdi: string, userdevice: string, device: string, type: string, bootable: boolean) =>
    obj('VBD', id, m('uuid', `uuid-${id}`) + m('VM', 'Ref:0') + m('VDI', vdi) + m('device', device) + m('userdevice', userdevice) + m('bootable', bool(bootable)) + m('type', type) + m('empty', bool(vdi === 'OpaqueRef:NULL')));
  const vdi = (id: string, label: string, size: string) => obj('VDI', id, m('uuid', `uuid-${id}`) + m('name_label', label) + m('virtual_size', size) + m('type', 'user') + m('SR', 'Ref:9'));
  return `<?xml version="1.0"?>\n<value><struct>${m('version', `<struct>${m('hostname', 'xs')}${m('product_version', '8.2.1')}${m('export_vsn', '2')}</struct>`)}` +
    `<member><name>objects</name><value><array><data>` +
    obj('VM', 'Ref:0', m('name_label', 'DDK &amp; friends') + m('is_a_template', bool(false)) + m('is_control_domain', bool(false)) + m('VBDs', '<array><data><value>Ref:1</value><value>Ref:2</value><value>Ref:5</value></data></array>')) +
    (o.extraVm ? obj('VM', 'Ref:8', m('name_label', 'other') + m('is_a_snapshot', bool(false))) : '') +
    obj('VM', 'Ref:7', m('name_label', 'a snapshot') + m('is_a_snapshot', bool(true))) +
    vbd('Ref:1', 'OpaqueRef:NULL', '3', 'xvdd', 'CD', false) +
    vbd('Ref:2', 'Ref:3', o.rootUserdevice ?? '0', o.rootDevice ?? 'xvda', 'Disk', o.rootBootable ?? true) +
    vbd('Ref:5', 'Ref:4', '1', 'xvdb', 'Disk', false) +
    vdi('Ref:3', 'root', o.size ?? '8589934592') + vdi('Ref:4', 'data', '1073741824') +
    obj('SR', 'Ref:9', m('name_label', 'Local storage')) +
    `</data></array></value></member></struct></value>\n`;
}

describe('parseXvaOvaXml', () => {
  it('reads XAPI\'s ova.xml: the VM, its VDIs and the root disk (userdevice 0)', () => {
    expect(parseXvaOvaXml(xapiOvaXml(), 'x.xva:ova.xml')).toEqual({
      version: 2,
      exportVsn: 2,
      vmName: 'DDK & friends',
      vdis: [{ id: 'Ref:3', nameLabel: 'root', virtualSize: 8589934592 }, { id: 'Ref:4', nameLabel: 'data', virtualSize: 1073741824 }],
      rootVdi: { id: 'Ref:3', nameLabel: 'root', virtualSize: 8589934592 },
      rootUserdevice: '0',
    });
  });

  it('finds the root by device xvda, then by the one bootable disk', () => {
    expect(parseXvaOvaXml(xapiOvaXml({ rootUserdevice: '2' }), 'ova.xml').rootVdi.id).toBe('Ref:3');
    expect(parseXvaOvaXml(xapiOvaXml({ rootUserdevice: '2', rootDevice: '' }), 'ova.xml').rootVdi.id).toBe('Ref:3');
  });

  it.each([
    ['no single root disk', xapiOvaXml({ rootUserdevice: '2', rootDevice: '', rootBootable: false }), /2 disks and no single one has userdevice 0, device xvda or is bootable/],
    ['version 1', '<appliance version="0.1"><vm name="vm"/></appliance>', /root element is <appliance>, not <value>: not an XVA version 2/],
    ['malformed XML', xapiOvaXml().replace('</struct></value>\n', ''), /^x: malformed XML/],
    ['a member without a name', xapiOvaXml().replace('<name>hostname</name>', ''), /not a well-formed XML-RPC value/],
    ['no objects', '<value><struct><member><name>version</name><value>1</value></member></struct></value>', /no objects|objects array/],
    ['two VMs', xapiOvaXml({ extraVm: true }), /expected one VM \(not a snapshot, not dom0\), found 2/],
    ['virtual_size not a number', xapiOvaXml({ size: '8e9' }), /VDI Ref:3 has virtual_size "8e9", not a number of bytes/],
    ['virtual_size 0', xapiOvaXml({ size: '0' }), /VDI Ref:3 has virtual_size "0"/],
    ['a VDI id that is a path', xapiOvaXml().replaceAll('Ref:3', '../x'), /VDI id "\.\.\/x" cannot name a directory/],
    ['a disk VBD with a VDI not in ova.xml', xapiOvaXml().replace(/<name>VDI<\/name><value>Ref:3</, '<name>VDI</name><value>Ref:99<'), /refers to "Ref:99", which is no VDI/],
    ['two objects with one id', xapiOvaXml().replace('<value>Ref:9</value></member><member><name>snapshot', '<value>Ref:3</value></member><member><name>snapshot'), /two objects have the id "Ref:3"/],
  ])('refuses %s', (_name, xml, pattern) => {
    const err = (() => {
      try {
        parseXvaOvaXml(xml, 'x');
      } catch (e) {
        return e;
      }
      return undefined;
    })();
    expect(err).toBeInstanceOf(InputError);
    expect((err as Error).message).toMatch(pattern);
  });
});

const MAKE_XVA = fileURLToPath(new URL('../../scripts/make-xva', import.meta.url));
const MiB = BLOCK_SIZE;

describe('XVA version 2 disks (scripts/make-xva: GNU tar, sha1sum, XXH64)', () => {
  let work: string;
  let disk: string;
  let raw: Buffer;
  let sha1Xva: string;
  let xxhXva: string;
  const opened: Source[] = [];

  /** Blocks 0, 2 and the short last one (5) hold data; 1, 3 and 4 are zeros. */
  beforeAll(async () => {
    work = await mkdtemp(join(tmpdir(), 'xva2-'));
    raw = Buffer.alloc(5 * MiB + 1000);
    for (const [at, len] of [[0, MiB], [2 * MiB, MiB], [5 * MiB, 1000]] as const) for (let i = 0; i < len; i++) raw[at + i] = (i * 7 + at / MiB) & 0xff;
    raw.write('marker in block 2', 2 * MiB + 100);
    disk = join(work, 'disk.raw');
    await writeFile(disk, raw);
    sha1Xva = await makeXva('disk.xva', ['--checksum', 'sha1']);
    xxhXva = await makeXva('xxh.xva', ['--checksum', 'xxhash']);
  });

  afterAll(async () => {
    for (const s of opened) await s.close();
    await rm(work, { recursive: true, force: true });
  });

  async function makeXva(name: string, args: string[], from = disk): Promise<string> {
    const out = join(work, name);
    await execa(MAKE_XVA, ['--disk', from, '--out', out, ...args]);
    return out;
  }

  async function open(path: string): Promise<OpenedXva> {
    const src = await FileSource.open(path, basename(path));
    opened.push(src);
    return openXva(src);
  }

  /** Where each member's data starts, from GNU tar's own listing (--block-number). */
  async function dataOffsets(xva: string): Promise<Map<string, number>> {
    const { stdout } = await execa('tar', ['-tvR', '-f', xva]);
    const map = new Map<string, number>();
    for (const line of stdout.split('\n')) {
      const m = /^block (\d+): \S+ \S+ +\d+ \S+ \S+ (.+)$/.exec(line);
      if (m) map.set(m[2]!, (Number(m[1]) + 1) * 512);
    }
    return map;
  }

  /** Unpack an .xva (GNU tar) into a fresh directory, for a test to change and repack. */
  async function unpack(xva: string, name: string): Promise<string> {
    const dir = join(work, name);
    await mkdir(dir);
    await execa('tar', ['-xf', xva, '-C', dir]);
    return dir;
  }

  /** Pack `members` of `dir` in this order, as make-xva does; a name listed twice is stored twice (not as a hard link). */
  async function repack(dir: string, members: string[], name = `${basename(dir)}.xva`): Promise<string> {
    const out = join(work, name);
    await writeFile(join(work, `${name}.list`), `${members.join('\n')}\n`);
    await execa('tar', ['--format=ustar', '--no-recursion', '--hard-dereference', '-C', dir, '-cf', out, '--verbatim-files-from', '-T', join(work, `${name}.list`)]);
    return out;
  }

  const members = (...counters: number[]) => ['ova.xml', ...counters.flatMap((c) => [`Ref:3/${String(c).padStart(8, '0')}`, `Ref:3/${String(c).padStart(8, '0')}.checksum`])];

  it('places each block at its offset, zeros where blocks are left out, a short last block at the end', async () => {
    for (const xva of [sha1Xva, xxhXva]) {
      const x = await open(xva);
      expect(x.ova.rootVdi).toEqual({ id: 'Ref:3', nameLabel: 'DDK root disk', virtualSize: raw.length });
      expect(x.layout.blocks.map((b) => [b.counter, b.offset, b.length])).toEqual([[0, 0, MiB], [2, 2 * MiB, MiB], [5, 5 * MiB, 1000]]);
      expect(x.layout.leftOut).toBe(3);
      expect(x.layout.checksums).toEqual([xva === sha1Xva ? 'sha1' : 'xxhash']);
      expect(x.disk.name).toBe(`${basename(xva)}:Ref:3`);
      expect(x.disk.size).toBe(raw.length);
      expect((await x.disk.read(0, x.disk.size)).equals(raw)).toBe(true);
      // Reads across a present/absent boundary and inside a left-out block.
      for (const [at, len] of [[MiB - 10, 30], [2 * MiB - 5, 200], [3 * MiB + 5, 100], [5 * MiB - 3, 1003], [2 * MiB + 100, 17]] as const) {
        expect((await x.disk.read(at, len)).equals(raw.subarray(at, at + len)), `${at}+${len}`).toBe(true);
      }
      expect((await x.disk.read(2 * MiB + 100, 17)).toString()).toBe('marker in block 2');
      await expectInputError(x.disk.read(raw.length - 1, 2), /disk\.xva:Ref:3|xxh\.xva:Ref:3/);
    }
  });

  it('writes the checksums as XAPI does: SHA-1 and XXH64 ("%016LX") of the block', async () => {
    const dir = await unpack(xxhXva, 'xxh-files');
    const block = await readFile(join(dir, 'Ref:3/00000002'));
    const { h64Raw } = await xxhash();
    // Published XXH64 test vectors (seed 0): the library is the reference implementation's.
    expect(h64Raw(Buffer.alloc(0)).toString(16)).toBe('ef46db3751d8e999');
    expect(h64Raw(Buffer.from('abc')).toString(16)).toBe('44bc2cf5ad770999');
    expect(await readFile(join(dir, 'Ref:3/00000002.xxhash'), 'latin1')).toBe(h64Raw(block).toString(16).padStart(16, '0').toUpperCase());
    const sha = await unpack(sha1Xva, 'sha-files');
    const { stdout } = await execa('sha1sum', [join(sha, 'Ref:3/00000005')]);
    expect(await readFile(join(sha, 'Ref:3/00000005.checksum'), 'latin1')).toBe(stdout.slice(0, 40));
  });

  it('takes block numbers as a counter: a zero-length keep-alive block takes a number but no place', async () => {
    const long = Buffer.alloc(12 * MiB);
    long.write('first', 0);
    long.write('after the keep-alive', 11 * MiB + 7);
    const path = join(work, 'long.raw');
    await writeFile(path, long);
    const x = await open(await makeXva('long.xva', ['--keep-alive'], path));
    // Zeros 1..10; the keep-alive goes in at the 8th, so the last block (offset 11 MiB) is number 12.
    expect(x.layout.blocks.map((b) => [b.counter, b.offset, b.length])).toEqual([[0, 0, MiB], [8, 8 * MiB, 0], [12, 11 * MiB, MiB]]);
    expect([x.layout.keepAlive, x.layout.leftOut]).toEqual([1, 10]);
    expect((await x.disk.read(0, x.disk.size)).equals(long)).toBe(true);
  });

  it('checks a block the first time it is read, once, and names a bad one (SHA-1 and XXH64)', async () => {
    for (const [xva, what] of [[sha1Xva, 'SHA-1'], [xxhXva, 'XXH64']] as const) {
      const copy = join(work, `bad-${basename(xva)}`);
      await writeFile(copy, await readFile(xva));
      const at = (await dataOffsets(copy)).get('Ref:3/00000002')!;
      await patch(copy, at + 12345, Buffer.from('X'));
      const x = await open(copy);
      // Block 0 is good and reads fine; block 2 fails however it is read, every time.
      expect((await x.disk.read(10, 10)).equals(raw.subarray(10, 20))).toBe(true);
      const name = basename(copy).replace(/\./g, '\\.');
      for (const [pos, len] of [[2 * MiB + 100, 17], [2 * MiB - 1, 2], [2 * MiB + 12345, 1]] as const) {
        await expectInputError(x.disk.read(pos, len), new RegExp(`^${name}:Ref:3/00000002: ${what} checksum mismatch: Ref:3/00000002\\.(checksum|xxhash) says [0-9a-fA-F]+, the block's 1048576 bytes hash to [0-9a-fA-F]+$`));
      }
    }
    const counted = { reads: 0 };
    const src = await FileSource.open(sha1Xva, 'disk.xva');
    opened.push(src);
    const counting: Source = { name: src.name, size: src.size, read: (p, l) => ((counted.reads += l === MiB ? 1 : 0), src.read(p, l)), close: () => src.close() };
    const x = await openXva(counting);
    await Promise.all([x.disk.read(0, 10), x.disk.read(100, 10), x.disk.read(MiB - 1, 1)]);
    await x.disk.read(500, 10);
    expect(counted.reads).toBe(1);
  });

  it('refuses a checksum file that is not hex', async () => {
    const copy = join(work, 'badsum.xva');
    await writeFile(copy, await readFile(sha1Xva));
    await patch(copy, (await dataOffsets(copy)).get('Ref:3/00000000.checksum')!, Buffer.from('zz'));
    await expectInputError((await open(copy)).disk.read(0, 1), /^badsum\.xva:Ref:3\/00000000\.checksum: is not 40 hex digits/);
  });

  it('refuses a truncated .xva: inside block data, inside a header, without an end-of-archive marker', async () => {
    const bytes = await readFile(sha1Xva);
    const offsets = await dataOffsets(sha1Xva);
    const cases: [number, RegExp][] = [
      [offsets.get('Ref:3/00000002')! + 1000, /^cut\.xva: tar entry at byte \d+ holds 1048576 bytes, which run past the end of the \d+-byte file: truncated$/],
      [offsets.get('Ref:3/00000002.checksum')! - 200, /^cut\.xva: the tar ends inside a header at byte \d+: truncated$/],
      [offsets.get('Ref:3/00000005.checksum')! + 512, /^cut\.xva: the tar ends at byte \d+ without an end-of-archive marker: truncated$/],
    ];
    for (const [size, pattern] of cases) {
      const cut = join(work, 'cut.xva');
      await writeFile(cut, bytes.subarray(0, size));
      await expectInputError(open(cut), pattern);
    }
  });

  it('refuses a gzip- or zstd-compressed .xva by name', async () => {
    for (const [tool, pattern] of [['pigz', /^disk\.xva\.gz: a gzip-compressed XVA \(an export with compression\): decompress it first/], ['zstd', /^disk\.xva\.gz: zstd-compressed \(as XAPI compresses an XVA export\)/]] as const) {
      const { stdout } = await execa(tool, ['-c', sha1Xva], { encoding: 'buffer' });
      const path = join(work, 'disk.xva.gz');
      await writeFile(path, stdout);
      const src = await FileSource.open(path, 'disk.xva.gz');
      opened.push(src);
      await expectInputError(refuseCompressedXva(src), pattern);
    }
    const plain = await FileSource.open(sha1Xva, 'disk.xva');
    opened.push(plain);
    await expect(refuseCompressedXva(plain)).resolves.toBeUndefined();
  });

  it('refuses what is not the layout: blocks of other sizes, beyond the disk, twice, without a checksum, and other entries', async () => {
    const dir = await unpack(sha1Xva, 'layout');
    const blocks = members(0, 2, 5);
    await writeFile(join(dir, 'README'), 'hello\n');
    await mkdir(join(dir, 'Ref:9'));
    await writeFile(join(dir, 'Ref:9/00000000'), '');
    await execa('ln', ['-s', '00000000', join(dir, 'Ref:3/link')]);
    // A middle block of 1000 bytes (with its right checksum), and one numbered beyond the disk.
    await writeFile(join(dir, 'Ref:3/00000003'), raw.subarray(5 * MiB, 5 * MiB + 1000));
    await writeFile(join(dir, 'Ref:3/00000003.checksum'), await readFile(join(dir, 'Ref:3/00000005.checksum')));
    await writeFile(join(dir, 'Ref:3/00000099'), raw.subarray(0, MiB));
    await writeFile(join(dir, 'Ref:3/00000099.checksum'), await readFile(join(dir, 'Ref:3/00000000.checksum')));
    await writeFile(join(dir, 'Ref:3/00000002.xxhash'), '0123456789ABCDEF');
    const cases: [string, string[], RegExp][] = [
      ['a short block in the middle', members(0, 2, 3, 5), /^t\.xva:Ref:3\/00000003: holds 1000 bytes; a block holds 1048576 \(1 MiB\), or 0 \(a keep-alive\), or the rest of the disk/],
      ['a block beyond virtual_size', members(0, 2, 5, 99), /^t\.xva:Ref:3\/00000099: starts at byte \d+, beyond the 5243880-byte disk \(virtual_size in ova\.xml\)$/],
      ['a duplicate block', [...blocks, 'Ref:3/00000002'], /^t\.xva:Ref:3\/00000002: duplicate block: number 2 is in the tar twice$/],
      ['a block without its checksum', blocks.filter((b) => b !== 'Ref:3/00000002.checksum'), /^t\.xva:Ref:3\/00000002: has no \.checksum \(SHA-1\) or \.xxhash sibling/],
      ['a block with two checksums', [...blocks, 'Ref:3/00000002.xxhash'], /^t\.xva:Ref:3\/00000002: has 2 checksum siblings/],
      ['a checksum without its block', [...blocks, 'Ref:3/00000099.checksum'], /^t\.xva:Ref:3\/00000099\.checksum: is the checksum of a block that is not in the tar$/],
      ['a file outside the layout', [...blocks, 'README'], /^t\.xva: tar entries outside the XVA layout .*: "README"$/],
      ['a directory of no VDI', [...blocks, 'Ref:9', 'Ref:9/00000000'], /^t\.xva: tar entries outside the XVA layout .*: "Ref:9\/", "Ref:9\/00000000"$/],
      ['a symlink', [...blocks, 'Ref:3/link'], /^t\.xva: tar entry "Ref:3\/link" has type "2": an XVA holds only files and directories$/],
      ['no first block', members(2, 5), /^t\.xva:Ref:3: has no block 00000000/],
      ['no last block', members(0, 2), /^t\.xva:Ref:3: the blocks end at byte 3145728 of the 5243880-byte disk: the last block, which XAPI always writes to mark the disk's end, is missing/],
      ['no blocks', ['ova.xml'], /^t\.xva: no blocks for the root disk Ref:3 in the tar$/],
      ['no ova.xml', blocks.slice(1), /^t\.xva: no ova\.xml in the tar: not an XVA$/],
      ['two ova.xml', [...blocks, 'ova.xml'], /^t\.xva: 2 ova\.xml entries in the tar$/],
    ];
    for (const [what, list, pattern] of cases) {
      const xva = await repack(dir, list, 't.xva');
      const err = await open(xva).then(() => undefined, (e: unknown) => e);
      expect(err, what).toBeInstanceOf(InputError);
      expect((err as Error).message, what).toMatch(pattern);
      await unlink(xva);
    }
    // Directory entries of a VDI are fine (GNU tar writes them when given the directory).
    const withDir = await open(await repack(dir, ['ova.xml', 'Ref:3', ...blocks.slice(1)], 'dir.xva'));
    expect((await withDir.disk.read(0, withDir.disk.size)).equals(raw)).toBe(true);
  });

  it('indexes without reading block data: one header read per entry', async () => {
    const src = await FileSource.open(sha1Xva, 'disk.xva');
    opened.push(src);
    let bytes = 0;
    const counting: Source = { name: src.name, size: src.size, read: (p, l) => ((bytes += l), src.read(p, l)), close: () => src.close() };
    const x = await openXva(counting);
    const ova = (await stat(join(await unpack(sha1Xva, 'index'), 'ova.xml'))).size;
    // 7 headers and the end marker, ova.xml; no block data.
    expect(bytes).toBe(8 * 512 + ova);
    expect(x.disk.dataBlocks.length).toBe(3);
  });
});
