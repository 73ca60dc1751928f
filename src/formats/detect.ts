import type { Source } from './source.js';

/**
 * What a SOURCE is, from its magic numbers: an ISO (ECMA-119 "CD001" at sector 16), an XVA
 * version 2 tar ("ustar" at 257), a VHD ("conectix" footer), or a raw disk (MBR/GPT signature, or
 * an ext superblock at offset 1024 for a bare file system).
 */
export type SourceKind = 'iso' | 'xva' | 'vhd' | 'disk' | 'unknown';

async function bytesAt(src: Source, position: number, length: number): Promise<Buffer | undefined> {
  if (position < 0 || position + length > src.size) return undefined;
  return src.read(position, length);
}

export async function detectSource(src: Source): Promise<SourceKind> {
  if ((await bytesAt(src, 16 * 2048 + 1, 5))?.toString('latin1') === 'CD001') return 'iso';
  if ((await bytesAt(src, 257, 5))?.toString('latin1') === 'ustar') return 'xva';
  if ((await bytesAt(src, src.size - 512, 8))?.toString('latin1') === 'conectix') return 'vhd';
  if ((await bytesAt(src, src.size - 511, 8))?.toString('latin1') === 'conectix') return 'vhd';
  if ((await bytesAt(src, 0, 8))?.toString('latin1') === 'conectix') return 'vhd';
  const mbr = await bytesAt(src, 510, 2);
  if (mbr && mbr[0] === 0x55 && mbr[1] === 0xaa) return 'disk';
  const ext = await bytesAt(src, 1024 + 56, 2);
  if (ext && ext.readUInt16LE(0) === 0xef53) return 'disk';
  return 'unknown';
}
