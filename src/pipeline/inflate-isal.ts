import { getSystemErrorName } from 'node:util';
import { EnvironmentError, InputError } from '../errors.js';
import { CHUNK_SIZE } from '../formats/xva.js';
import { loadAddon } from '../native.js';
import type { FileHandle } from 'node:fs/promises';
import type { Chunk } from './extract.js';
import type { StageContext } from './stage.js';

/**
 * The builtin engine's fast gunzip: ISA-L's inflate in a native addon (native/isal-inflate),
 * one thread per chunk reading the chunk from the file that holds it and writing the scratch
 * file itself, zero blocks left as holes. Where the addon is not built (no libisal-dev when
 * npm installed, or another platform), zlib in a worker thread does the same work more slowly.
 */

type EventKind = 'progress' | 'done' | 'data' | 'overflow' | 'input' | 'output' | 'cancelled';

interface Addon {
  start(path: string, extents: [number, number][], outFd: number, outOffset: number, limit: number,
    onEvent: (kind: EventKind, value: number, message: string) => void): { cancel(): void };
}

/** DDK2DOCKER_INFLATE: `zlib` or `isal` to choose, unset for ISA-L where it loads. */
export type InflateChoice = { kind: 'isal'; addon: Addon } | { kind: 'zlib'; why: string };

let cached: InflateChoice | undefined;

export function inflateChoice(): InflateChoice {
  const wanted = process.env.DDK2DOCKER_INFLATE;
  if (wanted !== undefined && wanted !== 'zlib' && wanted !== 'isal') throw new EnvironmentError(`DDK2DOCKER_INFLATE must be zlib or isal, not ${JSON.stringify(wanted)}`);
  if (wanted === 'zlib') return { kind: 'zlib', why: 'DDK2DOCKER_INFLATE=zlib' };
  if (!cached) {
    const loaded = loadAddon<Addon>('isal-inflate', 'isal_inflate', 'libisal-dev');
    cached = 'addon' in loaded ? { kind: 'isal', addon: loaded.addon } : { kind: 'zlib', why: loaded.why };
  }
  if (wanted === 'isal' && cached.kind === 'zlib') throw new EnvironmentError(`DDK2DOCKER_INFLATE=isal: ${cached.why}`);
  return cached;
}

/**
 * The inflater of one run over the scratch file `fh`: `chunk` gunzips one chunk from where it lies
 * (its `location`) and resolves with its decompressed size; `stop` cancels the chunks still running and waits for
 * their threads to let go of the scratch file (also a cleanup step, before the file is closed).
 */
export function isalInflater(ctx: StageContext, fh: FileHandle, addon: Addon): {
  chunk: (chunk: Chunk, input: string, advance: (upTo: number) => void) => Promise<number>;
  stop: () => Promise<void>;
} {
  const running = new Set<{ cancel(): void; ended: Promise<void> }>();
  const stop = ctx.cleanup.defer('stop the gunzip threads', async () => {
    for (const r of running) r.cancel();
    await Promise.all([...running].map((r) => r.ended));
  });
  const chunk = ({ location, offset }: Chunk, input: string, advance: (upTo: number) => void): Promise<number> => {
    if (ctx.signal.aborted) return Promise.reject(ctx.signal.reason);
    if (!location) return Promise.reject(new Error(`${input}: not in a local file, which the ISA-L inflater reads from`));
    let reported = 0;
    let ended!: () => void;
    let settle!: { resolve: (n: number) => void; reject: (err: unknown) => void };
    const result = new Promise<number>((resolve, reject) => (settle = { resolve, reject }));
    const onEvent = (kind: EventKind, value: number, message: string) => {
      if (kind === 'progress' || kind === 'done') {
        advance(offset + value);
        ctx.progress.add(value - reported);
        reported = value;
        if (kind === 'progress') return;
      }
      running.delete(job);
      ctx.signal.removeEventListener('abort', onAbort);
      ended();
      if (kind === 'done') settle.resolve(value);
      else if (kind === 'data') settle.reject(new InputError(input, `corrupt gzip data: ${message}`));
      else if (kind === 'overflow') settle.reject(new InputError(input, `decompresses to more than the ${CHUNK_SIZE}-byte chunk size`));
      else if (kind === 'input') settle.reject(new InputError(input, message));
      else if (kind === 'cancelled') settle.reject(ctx.signal.reason ?? new Error('the gunzip was cancelled'));
      else settle.reject(Object.assign(new Error(message), value > 0 ? { code: getSystemErrorName(-value) } : {}));
    };
    const extents = location.extents.map((e): [number, number] => [e.offset, e.length]);
    const handle = addon.start(location.path, extents, fh.fd, offset, CHUNK_SIZE, onEvent);
    const job = { cancel: () => handle.cancel(), ended: new Promise<void>((r) => (ended = r)) };
    running.add(job);
    const onAbort = () => handle.cancel();
    ctx.signal.addEventListener('abort', onAbort, { once: true });
    return result;
  };
  return { chunk, stop };
}
