import { randomUUID } from 'node:crypto';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import envPaths from 'env-paths';
import lockfile from 'proper-lockfile';
import { InputError } from './errors.js';

/**
 * Where ddk2docker keeps what it learns across runs (the catalogue of conversions, sha256s recorded
 * on first fetch). DDK2DOCKER_DATA_DIR moves it, so tests and CI jobs keep theirs apart.
 */
export function dataDir(): string {
  return process.env.DDK2DOCKER_DATA_DIR || envPaths('ddk2docker', { suffix: '' }).data;
}

/** One JSON document under dataDir(): what it is called in messages, its empty form and its check. */
export interface DataFile<T> {
  /** File name under dataDir(). */
  name: string;
  /** "the catalogue": in "cannot read the catalogue". */
  title: string;
  /** "a ddk2docker catalogue": in "not a ddk2docker catalogue (…)". */
  kind: string;
  empty(): T;
  /** The parsed JSON as a T, or an InputError naming the file. */
  check(json: unknown, file: string): T;
  /** How long a writer waits for another's lock. */
  lock: { retries: number; minTimeout: number; maxTimeout: number };
}

export function dataFilePath(f: DataFile<unknown>): string {
  return join(dataDir(), f.name);
}

/** The document, or its empty form when there is none yet; a damaged one is an error, never replaced. */
export async function readDataFile<T>(f: DataFile<T>): Promise<T> {
  const file = dataFilePath(f);
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return f.empty();
    throw new InputError(file, `cannot read ${f.title}: ${(err as Error).message}`, { cause: err });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new InputError(file, `not ${f.kind} (${(err as Error).message}); fix or remove it`, { cause: err });
  }
  return f.check(json, file);
}

/**
 * Change the document under its lock; when `change` says it changed it, the new content replaces
 * the file in one rename, so runs at once do not lose each other's entries and a reader never sees
 * half a file. `action` completes "cannot …" in the error of a failed write.
 */
export async function updateDataFile<T>(f: DataFile<T>, change: (doc: T) => boolean, action: string): Promise<void> {
  const file = dataFilePath(f);
  await mkdir(dataDir(), { recursive: true });
  const release = await lockfile.lock(file, { realpath: false, stale: 30_000, retries: f.lock });
  try {
    const doc = await readDataFile(f);
    if (!change(doc)) return;
    const tmp = `${file}.${process.pid}.${randomUUID()}.tmp`;
    try {
      await writeFile(tmp, `${JSON.stringify(doc, null, 2)}\n`);
      await rename(tmp, file);
    } catch (err) {
      await rm(tmp, { force: true });
      throw new InputError(file, `cannot ${action}: ${(err as Error).message}`, { cause: err });
    }
  } finally {
    await release();
  }
}
