import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { manifestFromTar, type Manifest } from '../../src/manifest.js';

/** The image's one layer exactly as the daemon keeps it (`docker save`). */
export async function savedLayerManifest(host: string, image: string): Promise<Manifest> {
  const dir = await mkdtemp(join(tmpdir(), 'save-'));
  try {
    const archive = join(dir, 'image.tar');
    await execa('docker', ['save', '-o', archive, image], { env: { DOCKER_HOST: host } });
    const manifest = JSON.parse(String((await execa('tar', ['-xOf', archive, 'manifest.json'])).stdout)) as { Layers: string[] }[];
    const layers = manifest[0]!.Layers;
    if (layers.length !== 1) throw new Error(`${image} has ${layers.length} layers`);
    const tar = execa('tar', ['-xOf', archive, layers[0]!], { encoding: 'buffer', buffer: false });
    const m = await manifestFromTar(tar.stdout, `${image} layer`);
    await tar;
    return m;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** What `docker export` of a container made from the image holds. */
export async function exportedManifest(host: string, image: string): Promise<Manifest> {
  const env = { DOCKER_HOST: host };
  const id = String((await execa('docker', ['create', '--network', 'none', image, '/bin/true'], { env })).stdout).trim();
  try {
    const tar = execa('docker', ['export', id], { env, encoding: 'buffer', buffer: false });
    const m = await manifestFromTar(tar.stdout, `docker export of ${image}`);
    await tar;
    return m;
  } finally {
    await execa('docker', ['rm', '-f', id], { env });
  }
}

/** Files Docker's init layer adds or replaces in every container; `docker export` shows them. */
export const DOCKER_INIT_PATHS = new Set(['.dockerenv', 'dev/console', 'dev/pts', 'dev/shm', 'etc/hostname', 'etc/hosts', 'etc/resolv.conf', 'etc/mtab', 'proc', 'sys']);

/**
 * A tree as `docker export` can show it. Docker's tar writer (daemon 20.10) keeps only the
 * security.capability xattr and writes mtimes before 1970 as 0; the init layer replaces its own
 * files and touches the directories it writes into. The image layer itself (`docker save`) keeps
 * everything, and is compared in full.
 */
export function asDockerExports(m: Manifest): Manifest {
  const out: Manifest = new Map();
  for (const [p, e] of m) {
    if (DOCKER_INIT_PATHS.has(p) || p.startsWith('dev/pts/') || p.startsWith('dev/shm/') || p.startsWith('proc/') || p.startsWith('sys/')) continue;
    const xattrs = Object.fromEntries(Object.entries(e.xattrs).filter(([k]) => k === 'security.capability'));
    const mtimeNs = p === 'dev' || p === 'etc' || e.mtimeNs < 0n ? 0n : e.mtimeNs;
    out.set(p, { ...e, xattrs, mtimeNs });
  }
  return out;
}

export async function manifestOfTarFile(path: string): Promise<Manifest> {
  const { createReadStream } = await import('node:fs');
  return manifestFromTar(createReadStream(path), path);
}

export async function imageIds(host: string): Promise<string[]> {
  const out = String((await execa('docker', ['images', '--all', '--quiet', '--no-trunc'], { env: { DOCKER_HOST: host } })).stdout);
  return out.split('\n').filter(Boolean).sort();
}

