import { mkdtemp } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';

const SCRIPT = fileURLToPath(new URL('../../scripts/dockerd', import.meta.url));

export interface Dockerd {
  /** `unix://…/docker.sock`: pass it as DOCKER_HOST to child processes. */
  host: string;
  /** The daemon's directory (data, state, socket, dockerd.log). */
  dir: string;
  /** Stops the daemon and its containers and removes dir. */
  stop(): Promise<void>;
}

/**
 * Starts a private dockerd (vfs, no network) for a test file's beforeAll; call stop() in afterAll.
 * Nothing global changes: no registry is reachable, so tests import the images they need.
 */
export async function startDockerd(): Promise<Dockerd> {
  // Short: the socket path must fit in 108 bytes.
  const dir = await mkdtemp('/tmp/dkd-');
  const stop = async () => {
    await execa(SCRIPT, ['stop', '--purge', dir]);
  };
  try {
    const { stdout } = await execa(SCRIPT, ['start', dir]);
    return { host: stdout.trim(), dir, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}
