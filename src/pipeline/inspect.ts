import { ExtFileSystem, type ExtInfo } from '../formats/ext/index.js';
import { readPartitionTable, type Partition } from '../formats/partitions.js';
import { DiskState, diskSteps } from './disk.js';
import type { PartitionChoice } from './map.js';
import type { RendererKind, StageTiming } from './runner.js';
import { runScoped } from './scope.js';
import { xvaSummary, type XvaSummary } from './xva.js';

/** What a SOURCE holds, read with the builtin engine: ova.xml, chunks, disk, partitions, file system, release. */
export interface InspectResult {
  source: { name: string; sha256: string; size: number; kind: string };
  ova?: { vmName: string; label: string; vdiSize: number; chunks: number[]; leftOut: number[] };
  /** An XVA version 2 source: its ova.xml's VM and root disk, its blocks. */
  xva?: XvaSummary;
  disk: { payload: 'raw' | 'vhd'; size: number };
  partitions: { scheme: string; list: Partition[] };
  root: { index: number; offset: number; size: number; fs: ExtInfo };
  release: { redhatRelease?: string; osRelease?: Record<string, string> };
  stages: StageTiming[];
}

export interface InspectOptions {
  source: string;
  sha256?: string;
  cacheDir: string;
  partition?: PartitionChoice;
  workdir?: string;
  renderer?: RendererKind;
  signal?: AbortSignal;
}

const RELEASE_LIMIT = 64 * 1024;

async function readText(fs: ExtFileSystem, path: string): Promise<string | undefined> {
  const entry = await fs.lookup(path, { follow: true });
  if (!entry || entry.type !== 'file' || entry.size > RELEASE_LIMIT) return undefined;
  const parts: Buffer[] = [];
  for await (const chunk of fs.readFile(entry)) parts.push(chunk);
  return Buffer.concat(parts).toString('utf8');
}

/** os-release is KEY=value lines with optional quotes. */
export function parseOsRelease(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const m = /^([A-Z0-9_]+)=(.*)$/.exec(line.trim());
    if (m) out[m[1]!] = m[2]!.replace(/^(["'])(.*)\1$/, '$2');
  }
  return out;
}

export async function inspectSource(opts: InspectOptions): Promise<InspectResult> {
  const d = new DiskState();
  let result: Omit<InspectResult, 'stages'> | undefined;
  const { stages } = await runScoped({ engine: 'builtin', ...(opts.workdir ? { workdir: opts.workdir } : {}), renderer: opts.renderer ?? 'auto', ...(opts.signal ? { signal: opts.signal } : {}) }, () => [
    ...diskSteps(d, { source: opts.source, cacheDir: opts.cacheDir, partition: opts.partition ?? 'auto', ...(opts.sha256 ? { sha256: opts.sha256 } : {}) }),
    {
      name: 'export',
      title: 'Read the root file system',
      run: async () => {
        const table = await readPartitionTable(d.raw.source!);
        const fs = await ExtFileSystem.open(d.root.source!);
        const redhat = await readText(fs, 'etc/redhat-release');
        const os = await readText(fs, 'etc/os-release');
        const present = d.extracted?.chunks.map((c) => c.index) ?? [];
        const leftOut = present.length ? Array.from({ length: Math.max(...present) + 1 }, (_, i) => i).filter((i) => !present.includes(i)) : [];
        result = {
          source: { name: d.fetched.name, sha256: d.fetched.sha256, size: d.fetched.size, kind: d.kind },
          ...(d.extracted ? { ova: { vmName: d.extracted.ova.vmName, label: d.extracted.ova.label, vdiSize: d.extracted.ova.rootVdi.size, chunks: present, leftOut } } : {}),
          ...(d.xva ? { xva: xvaSummary(d.xva) } : {}),
          disk: { payload: d.raw.payload, size: d.raw.size },
          partitions: { scheme: table.scheme, list: table.partitions },
          root: { index: d.root.index, offset: d.root.offset, size: d.root.size, fs: fs.info },
          release: { ...(redhat ? { redhatRelease: redhat.trim() } : {}), ...(os ? { osRelease: parseOsRelease(os) } : {}) },
        };
      },
    },
  ]);
  return { ...result!, stages };
}
