import { cp, mkdtemp, readFile, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { patch, readAt } from '../helpers/bytes.js';
import { leftovers } from '../helpers/cli.js';
import { startDockerd, type Dockerd } from '../helpers/dockerd.js';
import { buildFixture } from '../helpers/fixtures.js';
import { buildMiniDdk, debugfsWrite, expectOneLine, inodeOffset, isoFrom, ovaXml, runBounded, type MiniDdk } from '../helpers/faults.js';
import { imageIds } from '../helpers/images.js';

/**
 * Corrupt inputs through the whole CLI, both engines: every damaged ISO, ova.xml, gzip chunk, VHD,
 * partition table and ext file system ends in exit 1 and one stderr line naming the file and the
 * problem, within a time limit and a memory bound, with nothing left behind (no mount, no loop
 * device, no scratch file) and no image added. The intact inputs convert (last test), so each
 * failure is the damage's doing. Disk-level damage is applied to the raw disk or a VHD given
 * directly as SOURCE: cheap and exact.
 */
let dockerd: Dockerd;
let mini: MiniDdk;
let dir: string;
let work: string;
const files: Record<string, string> = {};

const u32le = (n: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n);
  return b;
};
const u32be = (n: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
};

/** A copy of `from` named `name` in the scratch dir, damaged by `damage`. */
async function variant(name: string, from: string, damage: (path: string) => Promise<void>): Promise<void> {
  const path = join(dir, name);
  await cp(from, path);
  await damage(path);
  files[name] = path;
}

/** An ISO made from a copy of the mini ISO's tree after `change`. */
async function isoVariant(name: string, change: (tree: string) => Promise<void>): Promise<void> {
  const tree = join(dir, `${name}.d`);
  await cp(mini.isoTree, tree, { recursive: true });
  await change(tree);
  files[name] = join(dir, name);
  await isoFrom(tree, files[name]);
}

/** Offset of the directory record named `name` in the ISO's root directory (ECMA-119 9.1). */
async function rootRecord(iso: string, name: string): Promise<number> {
  const pvd = await readAt(iso, 16 * 2048, 2048);
  const at = pvd.readUInt32LE(156 + 2) * 2048;
  const dirBytes = await readAt(iso, at, pvd.readUInt32LE(156 + 10));
  for (let o = 0; o < dirBytes.length; ) {
    const len = dirBytes[o]!;
    if (len === 0) {
      o = (Math.floor(o / 2048) + 1) * 2048;
      continue;
    }
    if (dirBytes.subarray(o + 33, o + 33 + dirBytes[o + 32]!).toString('latin1') === name) return at + o;
    o += len;
  }
  throw new Error(`${iso}: no ${name} in the root directory`);
}

const CHUNK = 'ddk/xvda/chunk-000000000.gz';
const SB = () => mini.partOffset + 1024;

beforeAll(async () => {
  dockerd = await startDockerd();
  dir = await mkdtemp('/tmp/e2e-faults-');
  work = await mkdtemp('/tmp/e2e-faults-work-');
  mini = await buildMiniDdk(join(dir, 'mini'));

  // The ISO and what it carries.
  await variant('truncated.iso', mini.iso, async (p) => truncate(p, Math.floor((await stat(p)).size / 2)));
  const ddkRecord = await rootRecord(mini.iso, 'DDK');
  await variant('record-extent.iso', mini.iso, (p) => patch(p, ddkRecord + 2, Buffer.concat([u32le(0xffffff), u32be(0xffffff)])));
  await variant('record-length.iso', mini.iso, (p) => patch(p, ddkRecord, Buffer.from([7])));
  await variant('record-data-length.iso', mini.iso, (p) => patch(p, ddkRecord + 10, Buffer.concat([u32le(0x7f000000), u32be(0x7f000000)])));
  await isoVariant('ova-malformed.iso', (t) => writeFile(join(t, 'ddk/ova.xml'), '<appliance><vm name="x"><label>cut here'));
  await isoVariant('ova-no-vdi.iso', (t) => writeFile(join(t, 'ddk/ova.xml'), '<appliance><vm name="x"><vbd device="xvda" vdi="v"/></vm></appliance>'));
  await isoVariant('ova-bigger.iso', (t) => writeFile(join(t, 'ddk/ova.xml'), ovaXml(3_500_000_000)));
  await isoVariant('ova-bigger-same-chunk.iso', (t) => writeFile(join(t, 'ddk/ova.xml'), ovaXml(mini.diskSize + 4096)));
  await isoVariant('ova-smaller.iso', (t) => writeFile(join(t, 'ddk/ova.xml'), ovaXml(4_000_000)));
  await isoVariant('chunk-beyond.iso', (t) => cp(join(t, CHUNK), join(t, 'ddk/xvda/chunk-000000007.gz')));
  await isoVariant('gzip-crc.iso', async (t) => {
    const p = join(t, CHUNK);
    await patch(p, (await stat(p)).size - 8, Buffer.from('dead', 'latin1'));
  });
  await isoVariant('gzip-cut.iso', async (t) => truncate(join(t, CHUNK), Math.floor((await stat(join(t, CHUNK))).size / 2)));
  // Garbled early in a 1 GB chunk (the default fixture's): the builtin engine's readers meet the
  // garbage (a broken directory) long before the chunk's CRC, at its end, and must still report
  // the chunk, not the file system the garbage made.
  const big = await buildFixture();
  const garbled = join(dir, 'gzip-garbled.d');
  await cp(join(big.dir, 'iso'), garbled, { recursive: true });
  await patch(join(garbled, CHUNK), Math.floor((await stat(join(garbled, CHUNK))).size / 10), Buffer.from('\xde\xad\xbe\xef\xde\xad\xbe\xef', 'latin1'));
  files['gzip-garbled.iso'] = join(dir, 'gzip-garbled.iso');
  await isoFrom(garbled, files['gzip-garbled.iso']);

  // VHD: footer (Checksum at 64, Data Offset at 16), dynamic header (Checksum at 36, Table Offset at 16), BAT.
  const dynamic = join(dir, 'dynamic.vhd');
  const fixed = join(dir, 'fixed.vhd');
  await execa('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', mini.disk, dynamic]);
  await execa('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', '-o', 'subformat=fixed', mini.disk, fixed]);
  files['dynamic.vhd'] = dynamic;
  files['fixed.vhd'] = fixed;
  const footerOf = async (p: string) => (await stat(p)).size - 512;
  await variant('fixed-footer.vhd', fixed, async (p) => patch(p, (await footerOf(p)) + 64, u32be(1)));
  // A dynamic VHD keeps a copy of its footer at offset 0: a reader may fall back to it, so both are damaged.
  await variant('dynamic-footers.vhd', dynamic, async (p) => {
    await patch(p, (await footerOf(p)) + 64, u32be(1));
    await patch(p, 64, u32be(1));
  });
  const header = Number((await readAt(dynamic, (await footerOf(dynamic)) + 16, 8)).readBigUInt64BE());
  await variant('dynamic-header.vhd', dynamic, (p) => patch(p, header + 36, u32be(1)));
  const bat = Number((await readAt(dynamic, header + 16, 8)).readBigUInt64BE());
  await variant('bat-past-end.vhd', dynamic, (p) => patch(p, bat, u32be(0x7fffffff)));

  // MBR: entries at 446 + 16 × i; starting LBA at +8, sector count at +12, type at +4.
  await variant('partition-beyond.raw', mini.disk, (p) => patch(p, 446 + 12, u32le(1_000_000)));
  await variant('partition-overlap.raw', mini.disk, (p) => patch(p, 446 + 16, Buffer.concat([Buffer.from([0, 0, 0, 0, 0x83, 0, 0, 0]), u32le(4096), u32le(8192)])));
  await variant('no-linux-partition.raw', mini.disk, (p) => patch(p, 446 + 4, Buffer.from([0x82])));

  // ext4 superblock (at 1024 into the partition): s_inodes_count 0, s_log_block_size 24, s_inodes_per_group 40, s_magic 56, s_inode_size 88.
  await variant('ext-magic.raw', mini.disk, (p) => patch(p, SB() + 56, Buffer.from([0, 0])));
  await variant('ext-inodes-per-group.raw', mini.disk, (p) => patch(p, SB() + 40, u32le(0x7fffffff)));
  await variant('ext-log-block-size.raw', mini.disk, (p) => patch(p, SB() + 24, u32le(64)));
  await variant('ext-inode-size.raw', mini.disk, (p) => patch(p, SB() + 88, Buffer.from([3, 0])));
  await variant('ext-inodes-count.raw', mini.disk, (p) => patch(p, SB(), u32le(0xffffffff)));
  // A directory linked below itself: a/b/up → a.
  await variant('ext-dir-loop.raw', mini.disk, (p) => debugfsWrite(p, 'ln /a /a/b/up'));
  // i_block[5] is the first extent's ee_start_lo.
  await variant('ext-extent-outside.raw', mini.disk, (p) => debugfsWrite(p, 'sif /etc/redhat-release block[5] 0x7fffffff'));
  // An index node that points at itself: the root says depth 1, and so does the block it names.
  const inode = await inodeOffset(mini, '/a/b/file');
  const leaf = (await readAt(mini.disk, inode + 40 + 12 + 8, 4)).readUInt32LE();
  const header1 = (max: number) => Buffer.from([0x0a, 0xf3, 1, 0, max, max >> 8, 1, 0, 0, 0, 0, 0]);
  const index = Buffer.concat([u32le(0), u32le(leaf), Buffer.alloc(4)]);
  await variant('ext-extent-loop.raw', mini.disk, async (p) => {
    await patch(p, inode + 40, Buffer.concat([header1(4), index]));
    await patch(p, mini.partOffset + leaf * 4096, Buffer.concat([header1(340), index]));
  });
});

afterAll(async () => {
  await dockerd?.stop();
  await rm(dir, { recursive: true, force: true });
  await rm(work, { recursive: true, force: true });
});

type Engine = 'builtin' | 'host';
/** [file, engines, message]: the message must name the file (or the file inside the ISO) and the problem. */
const CASES: [string, Engine[], RegExp][] = [
  ['truncated.iso', ['builtin'], /^ddk2docker: truncated\.iso: truncated: the Volume Space Size is \d+ blocks/],
  // fuseiso reads up to the cut: the chunk it serves is short.
  ['truncated.iso', ['host'], /^ddk2docker: truncated\.iso:ddk\/xvda\/chunk-000000000\.gz: corrupt gzip data: unexpected end of file$/],
  ['record-extent.iso', ['builtin'], /^ddk2docker: record-extent\.iso: "ddk": Location of Extent \(byte \d+\) .* beyond the end of the \d+-byte image$/],
  ['record-extent.iso', ['host'], /^ddk2docker: record-extent\.iso: no ddk\/ova\.xml in the ISO: not a DDK ISO$/],
  ['record-length.iso', ['builtin'], /^ddk2docker: record-length\.iso: directory record at offset \d+: Length of Directory Record 7 cannot hold/],
  ['record-length.iso', ['host'], /^ddk2docker: record-length\.iso: no ddk\/ova\.xml in the ISO: not a DDK ISO$/],
  // fuseiso lists the directory by its records and ignores an oversized Data Length; only the builtin reader can tell.
  ['record-data-length.iso', ['builtin'], /^ddk2docker: record-data-length\.iso: "ddk": Location of Extent .* Data Length 2130706432 lie beyond the end/],
  ['ova-malformed.iso', ['builtin', 'host'], /^ddk2docker: ova-malformed\.iso:ddk\/ova\.xml: malformed XML at line 1/],
  ['ova-no-vdi.iso', ['builtin', 'host'], /^ddk2docker: ova-no-vdi\.iso:ddk\/ova\.xml: no <vdi> element: the appliance has no disk$/],
  ['ova-bigger.iso', ['builtin', 'host'], /^ddk2docker: ova-bigger\.iso:ddk\/xvda: chunk 0 ends at byte 16777216, but ova\.xml declares a 3500000000-byte disk, so it must run to byte 1000000000$/],
  ['ova-bigger-same-chunk.iso', ['builtin', 'host'], /^ddk2docker: ova-bigger-same-chunk\.iso:ddk\/xvda: chunk 0 ends at byte 16777216, .* so it must run to byte 16781312$/],
  ['ova-smaller.iso', ['builtin', 'host'], /^ddk2docker: ova-smaller\.iso:ddk\/xvda: the chunks hold 16777216 bytes, more than the 4000000 bytes ova\.xml declares$/],
  ['chunk-beyond.iso', ['builtin', 'host'], /^ddk2docker: chunk-beyond\.iso:ddk\/xvda: chunks start beyond the 16777216-byte disk declared in ova\.xml: "chunk-000000007\.gz at byte 7000000000"$/],
  ['gzip-crc.iso', ['builtin'], /^ddk2docker: gzip-crc\.iso:ddk\/xvda\/chunk-000000000\.gz: corrupt gzip data: incorrect data check$/],
  ['gzip-crc.iso', ['host'], /^ddk2docker: gzip-crc\.iso:ddk\/xvda\/chunk-000000000\.gz: corrupt gzip data: invalid compressed data--crc error$/],
  ['gzip-cut.iso', ['builtin', 'host'], /^ddk2docker: gzip-cut\.iso:ddk\/xvda\/chunk-000000000\.gz: corrupt gzip data: unexpected end of file$/],
  ['gzip-garbled.iso', ['builtin', 'host'], /^ddk2docker: gzip-garbled\.iso:ddk\/xvda\/chunk-000000000\.gz: corrupt gzip data: /],
  ['fixed-footer.vhd', ['builtin', 'host'], /^ddk2docker: fixed-footer\.vhd: VHD footer checksum mismatch \(footer at offset \d+: stored 0x00000001, computed 0x[0-9a-f]{8}\)$/],
  ['dynamic-footers.vhd', ['builtin', 'host'], /^ddk2docker: dynamic-footers\.vhd: VHD footer checksum mismatch/],
  ['dynamic-header.vhd', ['builtin', 'host'], /^ddk2docker: dynamic-header\.vhd: VHD dynamic disk header checksum mismatch \(stored 0x00000001/],
  ['bat-past-end.vhd', ['builtin', 'host'], /^ddk2docker: bat-past-end\.vhd: VHD Block Allocation Table entry 0 points to sector 2147483647, past the end of the \d+-byte file$/],
  ['partition-beyond.raw', ['builtin'], /^ddk2docker: partition-beyond\.raw: partition 1 \(sectors 2048–1002047\) extends past the end of the disk \(32768 sectors\)$/],
  ['partition-beyond.raw', ['host'], /^ddk2docker: partition-beyond\.raw: partition 1 ends at byte 513048576, beyond the 16777216-byte disk$/],
  ['partition-overlap.raw', ['builtin'], /^ddk2docker: partition-overlap\.raw: partitions 1 \(sectors 2048–32767\) and 2 \(sectors 4096–12287\) overlap$/],
  ['partition-overlap.raw', ['host'], /^ddk2docker: partition-overlap\.raw: partitions 1 \(bytes 1048576–16777215\) and 2 \(bytes 2097152–6291455\) overlap$/],
  ['no-linux-partition.raw', ['builtin'], /^ddk2docker: no-linux-partition\.raw: no root file system found: no Linux partition holds .*1: swap \(type 82\)/],
  ['no-linux-partition.raw', ['host'], /^ddk2docker: no-linux-partition\.raw: no Linux partition holding .*partitions: 1 \(type 82, \d+ bytes\)$/],
  ['ext-magic.raw', ['builtin'], /^ddk2docker: ext-magic\.raw: no root file system found: .*\(partition 1: ext-magic\.raw partition 1: .*s_magic is 0x0, expected 0xef53\)/],
  ['ext-magic.raw', ['host'], /^ddk2docker: ext-magic\.raw: no Linux partition holding \/etc\/os-release or \/etc\/redhat-release; partitions: 1 \(type 83/],
  ['ext-inodes-per-group.raw', ['builtin'], /^ddk2docker: ext-inodes-per-group\.raw: no root file system found: .*s_inodes_per_group 2147483647 is invalid/],
  ['ext-log-block-size.raw', ['builtin'], /^ddk2docker: ext-log-block-size\.raw: no root file system found: .*s_log_block_size 64 is outside 0\.\.6/],
  ['ext-inode-size.raw', ['builtin'], /^ddk2docker: ext-inode-size\.raw: no root file system found: .*s_inode_size 3 is not a power of two/],
  ['ext-inodes-count.raw', ['builtin'], /^ddk2docker: ext-inodes-count\.raw: no root file system found: .*s_inodes_count 4294967295 is not/],
  // The kernel refuses these superblocks as a whole; mount(8) says so in one sentence.
  ...(['ext-inodes-per-group', 'ext-log-block-size', 'ext-inode-size', 'ext-inodes-count'].map((n) => [`${n}.raw`, ['host'], new RegExp(`^ddk2docker: ${n}\\.raw: no Linux partition holding .*\\(partition 1: cannot mount its ext4: wrong fs type, bad option, bad superblock`)]) as [string, Engine[], RegExp][]),
  ['ext-dir-loop.raw', ['builtin'], /^ddk2docker: ext-dir-loop\.raw partition 1: directory inode \d+ is reached a second time at "a\/b\/up" \(a directory cycle or hard-linked directory\)$/],
  ['ext-dir-loop.raw', ['host'], /^ddk2docker: ext-dir-loop\.raw partition 1: tar: a\/b\/up: Cannot stat: Too many levels of symbolic links$/],
  ['ext-extent-outside.raw', ['builtin'], /^ddk2docker: ext-extent-outside\.raw partition 1: inode \d+ extent 0 .*block 2147483647 lies outside the file system/],
  // The kernel answers EUCLEAN ("Structure needs cleaning", errno 117) to whoever touches the file first.
  ['ext-extent-outside.raw', ['host'], /^ddk2docker: ext-extent-outside\.raw partition 1: .*etc\/redhat-release.*(Structure needs cleaning|error -117)/],
  ['ext-extent-loop.raw', ['builtin'], /^ddk2docker: ext-extent-loop\.raw partition 1: inode \d+: extent tree block \d+: eh_depth 1 where 0 was expected$/],
  ['ext-extent-loop.raw', ['host'], /^ddk2docker: ext-extent-loop\.raw partition 1: tar: a\/b\/file: Read error at byte 0, while reading 6 bytes: Input\/output error$/],
];

/** Peak RSS a failing run may reach: the CLI's own footprint is about 100 MiB. */
const MAX_RSS_KIB = 256 * 1024;

describe.each(['builtin', 'host'] as const)('engine %s', (engine) => {
  const cases = CASES.filter(([, engines]) => engines.includes(engine));

  let before: string[];
  beforeAll(async () => {
    before = await imageIds(dockerd.host);
  });

  it.each(cases.map(([file, , message]) => [file, message] as const))('%s: one line naming it, exit 1, nothing left', async (file, message) => {
    const r = await runBounded(['convert', files[file]!, '--engine', engine, '--tag', 'ddk-fault:1', '--workdir', work, '--quiet'], { DOCKER_HOST: dockerd.host });
    expectOneLine(r, message);
    expect(r.maxRssKiB).toBeLessThan(MAX_RSS_KIB);
    expect(await leftovers(work)).toEqual([]);
  });

  it('no failing run added an image', async () => {
    expect(await imageIds(dockerd.host)).toEqual(before);
  });

  it('the intact ISO, raw disk and VHDs convert (so each failure above is its damage)', async () => {
    for (const source of [mini.iso, mini.disk, files['dynamic.vhd']!, files['fixed.vhd']!]) {
      const out = join(dir, `intact-${engine}.tar`);
      const r = await runBounded(['convert', source, '--engine', engine, '--output', `rootfs:${out}`, '--workdir', work, '--quiet']);
      expect(r.stderr, source).toBe('');
      expect(r.code).toBe(0);
      expect((await stat(out)).size).toBeGreaterThan(1 << 20);
      await rm(out);
    }
    expect(await leftovers(work)).toEqual([]);
  });
});

it('every damaged file differs from its original (the damage was applied)', async () => {
  const originals: Record<string, string> = { iso: mini.iso, raw: mini.disk };
  for (const [name, path] of Object.entries(files)) {
    if (name === 'dynamic.vhd' || name === 'fixed.vhd') continue;
    const ext = name.split('.').pop()!;
    const original = ext === 'vhd' ? files[name.startsWith('fixed') ? 'fixed.vhd' : 'dynamic.vhd']! : originals[ext]!;
    expect((await readFile(path)).equals(await readFile(original)), name).toBe(false);
  }
});
