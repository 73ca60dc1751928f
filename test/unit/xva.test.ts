import { describe, expect, it } from 'vitest';
import { InputError } from '../../src/errors.js';
import { CHUNK_SIZE, chunkLayout, parseOvaXml } from '../../src/formats/xva.js';

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
