import { dataFilePath, readDataFile, updateDataFile, type DataFile } from './datadir.js';
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

// A damaged record must stop the run: starting over would trust whatever is fetched next.
const RECORDS: DataFile<RecordFile> = {
  name: 'recorded-sha256.json',
  title: 'the recorded sha256s',
  kind: 'a file of recorded sha256s',
  empty: () => ({ version: 1, sources: {} }),
  check: (json, file) => {
    const p = json as Partial<RecordFile> | null;
    const valid =
      p !== null &&
      typeof p === 'object' &&
      p.version === 1 &&
      typeof p.sources === 'object' &&
      p.sources !== null &&
      Object.values(p.sources).every((e) => typeof e?.sha256 === 'string' && /^[0-9a-f]{64}$/.test(e.sha256) && typeof e.recorded === 'string' && typeof e.pipeline === 'string');
    if (!valid) throw new InputError(file, 'not a file of recorded sha256s (expected {"version": 1, "sources": {SOURCE: {sha256, recorded, pipeline}}}); fix or remove it');
    return p as RecordFile;
  },
  lock: { retries: 300, minTimeout: 5, maxTimeout: 100 },
};

export function recordedSha256File(): string {
  return dataFilePath(RECORDS);
}

/** The sha256 recorded for a source, if any. Writes are atomic renames, so no lock is needed to read. */
export async function recordedSha256(source: string): Promise<RecordedSha256 | undefined> {
  return (await readDataFile(RECORDS)).sources[source];
}

/**
 * Record a source's sha256 unless one is there already; returns what is recorded afterwards (the
 * earlier entry when another run got there first, which the caller must compare). Locked, so
 * pipelines running at once do not lose each other's entries.
 */
export async function recordSha256(source: string, entry: RecordedSha256): Promise<RecordedSha256> {
  let kept = entry;
  await updateDataFile(
    RECORDS,
    (records) => {
      const existing = records.sources[source];
      if (existing) kept = existing;
      else records.sources[source] = entry;
      return !existing;
    },
    `record the sha256 of ${source}`,
  );
  return kept;
}
