import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import lockfile from 'proper-lockfile';
import { dataDir } from './datadir.js';
import { InputError } from './errors.js';

/**
 * sha256s seen on the first fetch of a source that has no published sha256 (trust on first use):
 * later fetches of the same source must give the same bytes. Kept in one JSON file under
 * dataDir(), keyed by the source URL (or absolute path).
 */
export interface RecordedSha256 {
  sha256: string;
  /** ISO 8601 time of the first fetch. */
  recorded: string;
  /** The pipeline file that fetched it first. */
  pipeline: string;
}

interface RecordFile {
  version: 1;
  sources: Record<string, RecordedSha256>;
}

export function recordedSha256File(): string {
  return join(dataDir(), 'recorded-sha256.json');
}

async function readRecords(file: string): Promise<RecordFile> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { version: 1, sources: {} };
    throw new InputError(file, `cannot read the recorded sha256s: ${(err as Error).message}`, { cause: err });
  }
  // A damaged record must stop the run: starting over would trust whatever is fetched next.
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw new InputError(file, `not a file of recorded sha256s (${(err as Error).message}); fix or remove it`, { cause: err });
  }
  const p = parsed as Partial<RecordFile> | null;
  const valid =
    p !== null &&
    typeof p === 'object' &&
    p.version === 1 &&
    typeof p.sources === 'object' &&
    p.sources !== null &&
    Object.values(p.sources).every((e) => typeof e?.sha256 === 'string' && /^[0-9a-f]{64}$/.test(e.sha256) && typeof e.recorded === 'string' && typeof e.pipeline === 'string');
  if (!valid) throw new InputError(file, 'not a file of recorded sha256s (expected {"version": 1, "sources": {SOURCE: {sha256, recorded, pipeline}}}); fix or remove it');
  return p as RecordFile;
}

/** The sha256 recorded for a source, if any. Writes are atomic renames, so no lock is needed to read. */
export async function recordedSha256(source: string): Promise<RecordedSha256 | undefined> {
  return (await readRecords(recordedSha256File())).sources[source];
}

/**
 * Record a source's sha256 unless one is there already; returns what is recorded afterwards (the
 * earlier entry when another run got there first, which the caller must compare). Locked, so
 * pipelines running at once do not lose each other's entries.
 */
export async function recordSha256(source: string, entry: RecordedSha256): Promise<RecordedSha256> {
  const file = recordedSha256File();
  await mkdir(dataDir(), { recursive: true });
  const release = await lockfile.lock(file, { realpath: false, stale: 30_000, retries: { retries: 300, minTimeout: 5, maxTimeout: 100 } });
  try {
    const records = await readRecords(file);
    const existing = records.sources[source];
    if (existing) return existing;
    records.sources[source] = entry;
    const tmp = `${file}.${process.pid}.tmp`;
    try {
      await writeFile(tmp, `${JSON.stringify(records, null, 2)}\n`);
      await rename(tmp, file);
    } catch (err) {
      await rm(tmp, { force: true });
      throw new InputError(file, `cannot record the sha256 of ${source}: ${(err as Error).message}`, { cause: err });
    }
    return entry;
  } finally {
    await release();
  }
}
