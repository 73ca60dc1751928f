import { imageIdOf, imageLayers, runOnce, tagImage } from '../docker/daemon.js';
import type { Imported } from './import.js';
import type { StageContext } from './stage.js';

/** verify: prove the image is right before it gets a name; a failure removes it (see import). */
export interface Verified {
  smokeOutput?: string;
  tag?: string;
}

export const DEFAULT_SMOKE = 'cat /etc/redhat-release 2>/dev/null || cat /etc/os-release';

export async function verify(ctx: StageContext, imported: Imported, opts: { smoke: string; tag?: string; labels: Record<string, string> }): Promise<Verified> {
  if (!imported.docker || !imported.imageId) return {};
  const { docker, imageId } = imported;
  const info = await imageLayers(docker, imageId);
  if (info.layers.length !== 1 || info.layers[0] !== imported.diffId) {
    throw new Error(`image ${imageId}: the daemon stored layer ${info.layers.join(', ') || 'none'}, but ${imported.diffId} was sent`);
  }
  for (const [k, v] of Object.entries(opts.labels)) {
    if (info.labels[k] !== v) throw new Error(`image ${imageId}: label ${k} is ${JSON.stringify(info.labels[k])}, expected ${JSON.stringify(v)}`);
  }
  const { code, output } = await runOnce(docker, imageId, ['/bin/sh', '-c', opts.smoke], { signal: ctx.signal });
  if (code !== 0) throw new Error(`smoke command ${JSON.stringify(opts.smoke)} failed in image ${imageId.slice(7, 19)} with exit code ${code}: ${output.split('\n').slice(-3).join(' | ')}`);
  ctx.note(output.split('\n')[0] ?? '');
  if (opts.tag) {
    // If a later stage fails, the new image is removed: give the tag back to the image it named.
    const previous = await imageIdOf(docker, opts.tag);
    if (previous && previous !== imageId) ctx.cleanup.onFailure(`give ${opts.tag} back to ${previous}`, () => tagImage(docker, previous, opts.tag!));
    await tagImage(docker, imageId, opts.tag);
  }
  return { smokeOutput: output, ...(opts.tag ? { tag: opts.tag } : {}) };
}
