import { imageIdOf, imageLayers, runOnce, tagImage } from '../docker/daemon.js';
import type { Imported } from './import.js';
import type { StageContext } from './stage.js';

/** verify: prove the image is right before it gets a name; a failure removes it (see import). */
export interface Verified {
  smokeOutput?: string;
  tag?: string;
}

export const DEFAULT_SMOKE = 'cat /etc/redhat-release 2>/dev/null || cat /etc/os-release';

export const VFS_SMOKE_SKIPPED = 'smoke skipped: vfs storage driver copies the whole layer per container; pass --smoke CMD to run one';

/**
 * The smoke command to run, if any: an explicit one always, none with `false` (--no-smoke), and
 * by default DEFAULT_SMOKE — except on the vfs storage driver, where creating the container
 * alone copies the whole layer (as long again as the import); the layer digest and labels are
 * checked all the same.
 */
async function smokeCommand(ctx: StageContext, docker: NonNullable<Imported['docker']>, smoke: string | false | undefined): Promise<string | undefined> {
  if (smoke === false) {
    ctx.note('smoke skipped (--no-smoke)');
    return undefined;
  }
  if (smoke !== undefined) return smoke;
  if (((await docker.info()) as { Driver?: string }).Driver === 'vfs') {
    ctx.note(VFS_SMOKE_SKIPPED);
    return undefined;
  }
  return DEFAULT_SMOKE;
}

export async function verify(ctx: StageContext, imported: Imported, opts: { smoke?: string | false; tag?: string; labels: Record<string, string> }): Promise<Verified> {
  if (!imported.docker || !imported.imageId) return {};
  const { docker, imageId } = imported;
  const info = await imageLayers(docker, imageId);
  if (info.layers.length !== 1 || info.layers[0] !== imported.diffId) {
    throw new Error(`image ${imageId}: the daemon stored layer ${info.layers.join(', ') || 'none'}, but ${imported.diffId} was sent`);
  }
  for (const [k, v] of Object.entries(opts.labels)) {
    if (info.labels[k] !== v) throw new Error(`image ${imageId}: label ${k} is ${JSON.stringify(info.labels[k])}, expected ${JSON.stringify(v)}`);
  }
  const smoke = await smokeCommand(ctx, docker, opts.smoke);
  let smokeOutput: string | undefined;
  if (smoke !== undefined) {
    const { code, output } = await runOnce(docker, imageId, ['/bin/sh', '-c', smoke], { signal: ctx.signal });
    if (code !== 0) throw new Error(`smoke command ${JSON.stringify(smoke)} failed in image ${imageId.slice(7, 19)} with exit code ${code}: ${output.split('\n').slice(-3).join(' | ')}`);
    ctx.note(output.split('\n')[0] ?? '');
    smokeOutput = output;
  }
  if (opts.tag) {
    // If a later stage fails, the new image is removed: give the tag back to the image it named.
    const previous = await imageIdOf(docker, opts.tag);
    if (previous && previous !== imageId) ctx.cleanup.onFailure(`give ${opts.tag} back to ${previous}`, () => tagImage(docker, previous, opts.tag!));
    await tagImage(docker, imageId, opts.tag);
  }
  return { ...(smokeOutput !== undefined ? { smokeOutput } : {}), ...(opts.tag ? { tag: opts.tag } : {}) };
}
