import type { TransformCallback } from 'node:stream';
import { Digester } from '../stream-sha256.js';
import { decodePaxRecords } from '../formats/tar.js';

/**
 * A pass-through over the layer tar that counts bytes and entries while the data flows and, when
 * asked, computes its diffID (sha256 of the uncompressed tar), so nothing is read twice. The file
 * outputs hash the layer as they write it, so they do not ask. Entries are counted by walking the
 * 512-byte headers: data blocks are skipped without being looked at.
 */
export class LayerMeter extends Digester {
  files = 0;
  private skip = 0;
  private header = Buffer.alloc(0);
  private paxSize: number | undefined;
  private paxData: Buffer | undefined;
  private paxLeft = 0;
  private ended = false;

  constructor(opts: { hash: boolean }, onBytes?: (n: number) => void) {
    super((_total, added) => onBytes?.(added), { hash: opts.hash, highWaterMark: 4 << 20 });
  }

  get diffId(): string {
    return this.digest();
  }

  override _transform(chunk: Buffer, encoding: BufferEncoding, callback: TransformCallback): void {
    this.scan(chunk);
    super._transform(chunk, encoding, callback);
  }

  private scan(chunk: Buffer): void {
    let pos = 0;
    while (pos < chunk.length && !this.ended) {
      if (this.skip > 0) {
        const n = Math.min(this.skip, chunk.length - pos);
        if (this.paxData && this.paxLeft > 0) {
          const take = Math.min(n, this.paxLeft);
          this.paxData = Buffer.concat([this.paxData, chunk.subarray(pos, pos + take)]);
          this.paxLeft -= take;
          if (this.paxLeft === 0) this.notePax(this.paxData);
        }
        this.skip -= n;
        pos += n;
        continue;
      }
      const need = 512 - this.header.length;
      this.header = Buffer.concat([this.header, chunk.subarray(pos, pos + need)]);
      pos += Math.min(need, chunk.length - pos);
      if (this.header.length < 512) return;
      this.onHeader(this.header);
      this.header = Buffer.alloc(0);
    }
  }

  private onHeader(h: Buffer): void {
    if (h.every((b) => b === 0)) {
      this.ended = true;
      return;
    }
    const flag = String.fromCharCode(h[156]!);
    const field = h.subarray(124, 136);
    let size = field[0]! & 0x80 ? Number(field.subarray(4).readBigUInt64BE()) : parseInt(field.toString('latin1').replace(/\0.*$/s, '').trim() || '0', 8);
    if (flag === 'x' || flag === 'g' || flag === 'L' || flag === 'K') {
      if (flag === 'x') {
        this.paxData = Buffer.alloc(0);
        this.paxLeft = size;
      }
    } else {
      this.files++;
      if (this.paxSize !== undefined) size = this.paxSize;
      this.paxSize = undefined;
      // Only regular files carry data blocks.
      if (!(flag === '0' || flag === '\0' || flag === '7')) size = 0;
    }
    this.skip = Math.ceil(size / 512) * 512;
  }

  private notePax(data: Buffer): void {
    const size = decodePaxRecords(data, 'layer').get('size');
    this.paxSize = size ? Number(size.toString()) : undefined;
    this.paxData = undefined;
  }
}
