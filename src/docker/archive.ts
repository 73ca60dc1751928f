import { open, type FileHandle } from 'node:fs/promises';
import type { Readable } from 'node:stream';
import { canonicalJson, parseTag, resolveCreated, type ImageMeta } from './image.js';
import { blobPath, buildImage, imageResult, OCI_LAYOUT } from './oci.js';
import { replaceOnSuccess, writeLayer, type OutputResult, type WriteOptions } from './rootfs.js';

/**
 * `docker-archive:FILE`: what `docker save` writes and `docker load` reads. We write the layout of
 * Docker ≥ 25, which is at the same time an OCI image layout in a tar (blobs/sha256/…, index.json,
 * oci-layout) plus Docker's manifest.json, so `docker load` of any version and OCI tools both read it.
 *
 * The layer's tar header must hold its size, and its name holds its digest, neither known until the
 * layer has streamed through; the header is written as a placeholder, the layer streamed straight
 * into the file behind it, and the header then rewritten in place. No temporary copy of the layer.
 */

const BLOCK = 512;
const MAX_OCTAL_SIZE = 8 ** 11 - 1;

function octal(block: Buffer, offset: number, length: number, value: number): void {
  block.write(value.toString(8).padStart(length - 1, '0'), offset, length - 1, 'latin1');
}

/** One ustar header block; sizes beyond 8 GiB use the GNU base-256 encoding every tar reader accepts. */
export function tarHeader(name: string, type: 'file' | 'directory', size: number, mtime: number): Buffer {
  const block = Buffer.alloc(BLOCK);
  if (Buffer.byteLength(name) > 100) throw new Error(`tar entry name longer than 100 bytes: ${name}`);
  block.write(name, 0, 100, 'utf8');
  octal(block, 100, 8, type === 'directory' ? 0o755 : 0o644);
  octal(block, 108, 8, 0);
  octal(block, 116, 8, 0);
  if (size <= MAX_OCTAL_SIZE) {
    octal(block, 124, 12, size);
    block.write('ustar\x0000', 257, 8, 'latin1');
  } else {
    block[124] = 0x80;
    let v = BigInt(size);
    for (let i = 135; i > 124; i--, v >>= 8n) block[i] = Number(v & 0xffn);
    block.write('ustar  \x00', 257, 8, 'latin1');
  }
  octal(block, 136, 12, mtime);
  block[156] = (type === 'directory' ? '5' : '0').charCodeAt(0);
  block.fill(0x20, 148, 156);
  let sum = 0;
  for (const b of block) sum += b;
  block.write(`${sum.toString(8).padStart(6, '0')}\x00 `, 148, 8, 'latin1');
  return block;
}

function padding(size: number): Buffer {
  return Buffer.alloc((BLOCK - (size % BLOCK)) % BLOCK);
}

/** pwrite the whole buffer; a regular file may take it in several writes. */
async function writeAt(file: FileHandle, data: Buffer, position: number): Promise<number> {
  let done = 0;
  while (done < data.length) {
    const { bytesWritten } = await file.write(data, done, data.length - done, position + done);
    done += bytesWritten;
  }
  return data.length;
}

export async function writeDockerArchive(layer: Readable, target: string, meta: ImageMeta, opts: WriteOptions): Promise<OutputResult> {
  const tag = meta.tag === undefined ? undefined : parseTag(meta.tag);
  const created = resolveCreated(meta.created);
  const mtime = Math.max(0, Math.floor(Date.parse(created) / 1000));
  return replaceOnSuccess(target, 'file', opts.signal, async (temp) => {
    const file = await open(temp, 'w', 0o644);
    try {
      let pos = 0;
      for (const dir of ['blobs/', 'blobs/sha256/']) pos += await writeAt(file, tarHeader(dir, 'directory', 0, mtime), pos);
      const layerHeaderAt = pos;
      pos += await writeAt(file, tarHeader(blobPath(`sha256:${'0'.repeat(64)}`), 'file', 0, 0), pos);
      const written = await writeLayer(layer, file, pos, { signal: opts.signal, onProgress: opts.onProgress });
      pos += written.storedBytes;
      pos += await writeAt(file, padding(written.storedBytes), pos);

      const image = buildImage({ ...meta, created }, written, false);
      await writeAt(file, tarHeader(blobPath(written.digest), 'file', written.storedBytes, mtime), layerHeaderAt);
      const manifestJson = canonicalJson([{
        Config: blobPath(image.config.descriptor.digest),
        RepoTags: tag ? [`${tag.repository}:${tag.tag}`] : null,
        Layers: [blobPath(written.digest)],
      }]);
      const entries: [string, Buffer][] = [
        [blobPath(image.config.descriptor.digest), image.config.bytes],
        [blobPath(image.manifest.descriptor.digest), image.manifest.bytes],
        ['index.json', image.index],
        ['manifest.json', manifestJson],
        ['oci-layout', OCI_LAYOUT],
      ];
      const tail: Buffer[] = [];
      for (const [name, data] of entries) tail.push(tarHeader(name, 'file', data.length, mtime), data, padding(data.length));
      // End of archive: two zero blocks.
      tail.push(Buffer.alloc(2 * BLOCK));
      await writeAt(file, Buffer.concat(tail), pos);
      return imageResult(target, written, image);
    } finally {
      await file.close();
    }
  });
}
