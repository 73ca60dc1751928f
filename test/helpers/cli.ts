import { mkdtempSync, rmSync } from 'node:fs';
import { readdir, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { execa, type ResultPromise } from 'execa';

/**
 * The built CLI, run as a user would run it (npm test builds dist/ first). DDK2DOCKER_TEST_CLI
 * names another build: a copy that a concurrent rebuild of dist/ cannot change mid-run.
 */
export const CLI = process.env.DDK2DOCKER_TEST_CLI ?? fileURLToPath(new URL('../../dist/cli.js', import.meta.url));

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * Conversions record themselves in the catalogue under the data directory: runs from tests that
 * name none get a private one (per test file, removed at exit), never the user's.
 */
const DATA_DIR = mkdtempSync(join(tmpdir(), 'ddk2docker-data-'));
process.on('exit', () => rmSync(DATA_DIR, { recursive: true, force: true }));

export function startCli(args: string[], env: Record<string, string> = {}): ResultPromise<{ reject: false; env: Record<string, string> }> {
  return execa(process.execPath, [CLI, ...args], { reject: false, env: { DDK2DOCKER_DATA_DIR: process.env.DDK2DOCKER_DATA_DIR ?? DATA_DIR, ...env } });
}

export async function runCli(args: string[], env: Record<string, string> = {}): Promise<CliResult> {
  const r = await startCli(args, env);
  return { code: r.exitCode ?? -1, stdout: String(r.stdout), stderr: String(r.stderr) };
}

/**
 * What a run may have left behind under `parent` (its --workdir parent): mounts, loop devices,
 * files. Empty when the run cleaned up after itself.
 */
export async function leftovers(parent: string): Promise<string[]> {
  const found: string[] = [];
  for (const line of (await readFile('/proc/mounts', 'utf8')).split('\n')) {
    if (line.split(' ')[1]?.startsWith(parent)) found.push(`mount: ${line}`);
  }
  const loops = (await execa('losetup', ['--list', '--noheadings', '--output', 'NAME,BACK-FILE'], { reject: false })).stdout;
  for (const line of String(loops).split('\n')) if (line.includes(parent)) found.push(`loop: ${line.trim()}`);
  for (const name of await readdir(parent).catch(() => [])) found.push(`file: ${parent}/${name}`);
  return found;
}
