import { randomUUID } from 'node:crypto';
import { stat } from 'node:fs/promises';
import { z } from 'zod';
import { dataFilePath, readDataFile, updateDataFile, type DataFile } from './datadir.js';
import { connect, daemonName, imageIdOf } from './docker/daemon.js';
import { InputError, printable } from './errors.js';
import type { ConvertResult } from './pipeline/pipeline.js';

/**
 * The catalogue: every successful conversion on this machine, like an inventory. One JSON file
 * under dataDir(), replaced atomically (temp file + rename) under a lock, so conversions running
 * at once do not lose each other's records and a reader never sees half a file.
 */

const RegisteredVm = z.object({ vm: z.string(), xapi: z.string(), since: z.string() });

const Entry = z
  .object({
    id: z.string(),
    /** ISO 8601 time the conversion finished. */
    created: z.string(),
    source: z.object({ name: z.string(), sha256: z.string(), url: z.string().optional() }),
    /** ova.xml's label of the VM. */
    ovaLabel: z.string().optional(),
    /** /etc/redhat-release of the DDK, its platform (linux/386, linux/amd64) and Dom0 kernel. */
    release: z.string().optional(),
    platform: z.string().optional(),
    kernel: z.string().optional(),
    engine: z.string(),
    /** The --output target: docker, docker-archive:FILE, oci:DIR, rootfs:FILE. */
    output: z.string(),
    /** For --output docker: the image and the daemon that holds it. */
    image: z.object({ id: z.string(), tag: z.string().nullable() }).optional(),
    daemon: z.string().optional(),
    /** For the file outputs: the absolute path written. */
    path: z.string().optional(),
    diffId: z.string(),
    files: z.number(),
    bytes: z.number(),
    /** Docker VMs registered with xscontainer for this image. */
    registeredVms: z.array(RegisteredVm),
  })
  // Fields a later version adds survive a rewrite by this one.
  .passthrough();

const CatalogueFile = z.object({ version: z.literal(1), conversions: z.array(Entry) }).passthrough();

export type CatalogueEntry = z.infer<typeof Entry>;
type Catalogue = z.infer<typeof CatalogueFile>;

const CATALOGUE: DataFile<Catalogue> = {
  name: 'catalogue.json',
  title: 'the catalogue',
  kind: 'a ddk2docker catalogue',
  empty: () => ({ version: 1, conversions: [] }),
  check: (json, file) => {
    const parsed = CatalogueFile.safeParse(json);
    if (parsed.success) return parsed.data;
    const issue = parsed.error.issues[0]!;
    throw new InputError(file, `not a ddk2docker catalogue (${issue.path.join('.') || 'top level'}: ${issue.message}); fix or remove it`);
  },
  lock: { retries: 100, minTimeout: 50, maxTimeout: 500 },
};

export function catalogueFile(): string {
  return dataFilePath(CATALOGUE);
}

/** Change the catalogue under its lock. */
function updateCatalogue(change: (c: Catalogue) => void): Promise<void> {
  return updateDataFile(CATALOGUE, (c) => (change(c), true), 'write the catalogue');
}

/** Probe results may be absent (or null in a result that went through JSON). */
function text(value: string | null | undefined): string | undefined {
  return typeof value === 'string' && value ? value : undefined;
}

/** Record a successful conversion; a registered VM is also noted on the other records of its image. */
export async function recordConversion(r: ConvertResult): Promise<CatalogueEntry> {
  const now = new Date().toISOString();
  const vm = r.registered?.monitor === 'True' ? { vm: r.registered.vm, xapi: r.registered.xapi, since: now } : undefined;
  const release = text(r.release);
  const platform = text(r.platform);
  const kernel = text(r.kernel);
  const entry: CatalogueEntry = {
    id: randomUUID(),
    created: now,
    source: { name: r.source.name, sha256: r.source.sha256, ...(r.source.url ? { url: r.source.url } : {}) },
    ...(r.ova?.label ? { ovaLabel: r.ova.label } : {}),
    ...(release ? { release } : {}),
    ...(platform ? { platform } : {}),
    ...(kernel ? { kernel } : {}),
    engine: r.engine,
    output: r.output,
    ...(r.image ? { image: r.image, daemon: daemonName() } : {}),
    ...(r.path ? { path: r.path } : {}),
    diffId: r.diffId,
    files: r.files,
    bytes: r.bytes,
    registeredVms: vm ? [vm] : [],
  };
  await updateCatalogue((c) => {
    if (vm && entry.image) {
      for (const e of c.conversions) {
        if (e.image?.id === entry.image.id && e.daemon === entry.daemon && !e.registeredVms.some((v) => v.vm === vm.vm)) e.registeredVms.push(vm);
      }
    }
    c.conversions.push(entry);
  });
  return entry;
}

/** A VM deregistered from xscontainer monitors no image any more. */
export async function forgetVm(vm: string): Promise<void> {
  await updateCatalogue((c) => {
    for (const e of c.conversions) e.registeredVms = e.registeredVms.filter((v) => v.vm !== vm);
  });
}

/** The catalogue is bookkeeping: failing to update it must not turn a finished conversion into a failure. */
export function warnCatalogue(err: unknown): void {
  process.stderr.write(`ddk2docker: warning: the catalogue was not updated: ${printable((err as Error).message ?? String(err))}\n`);
}

/** present: the image (in the daemon it was made in) or the file is still there; unknown: that daemon does not answer here. */
export type EntryState = 'present' | 'gone' | 'unknown';

export type ListedEntry = CatalogueEntry & { state: EntryState };

const PING_TIMEOUT_MS = 5000;

async function daemonAnswers(docker: ReturnType<typeof connect>): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<false>((resolve) => (timer = setTimeout(() => resolve(false), PING_TIMEOUT_MS)));
  try {
    return await Promise.race([docker.ping().then(() => true, () => false), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Every recorded conversion, oldest first, with whether its image or file is still there. */
export async function listCatalogue(): Promise<ListedEntry[]> {
  const { conversions } = await readDataFile(CATALOGUE);
  const here = daemonName();
  const docker = connect();
  const reachable = conversions.some((e) => e.image && e.daemon === here) && (await daemonAnswers(docker));
  return Promise.all(
    conversions.map(async (e): Promise<ListedEntry> => {
      let state: EntryState;
      if (e.image) {
        state = reachable && e.daemon === here ? await imageIdOf(docker, e.image.id).then((id) => (id ? 'present' : 'gone'), () => 'unknown' as const) : 'unknown';
      }
      else state = e.path ? await stat(e.path).then(() => 'present' as const, () => 'gone' as const) : 'unknown';
      return { ...e, state };
    }),
  );
}

/** An aligned table, one conversion a line; every value from an image or a file name is escaped. */
export function catalogueTable(entries: ListedEntry[]): string {
  const header = ['CREATED', 'SOURCE', 'SHA256', 'OVA LABEL', 'RELEASE', 'IMAGE / OUTPUT', 'DIFFID', 'STATE', 'REGISTERED VMS'];
  const rows = entries.map((e) => [
    e.created.replace(/\.\d+Z$/, 'Z'),
    e.source.name,
    e.source.sha256.slice(0, 12),
    e.ovaLabel ?? '-',
    e.release ?? '-',
    e.image ? `${e.image.tag ?? '<untagged>'} ${e.image.id.slice(7, 19)}` : (e.path ?? e.output),
    e.diffId.slice(0, 19),
    e.state,
    e.registeredVms.map((v) => v.vm).join(',') || '-',
  ].map((v) => printable(v)));
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]!))).join('  ');
  return `${[header, ...rows].map(line).join('\n')}\n`;
}
