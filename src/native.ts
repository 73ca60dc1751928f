import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

/**
 * The optional native addons under native/, built by `npm install` (scripts/build-native). Each
 * has a pure-Node fallback, so an addon that is not there is a reason to report, not an error.
 */
export type Loaded<T> = { addon: T } | { why: string };

export function loadAddon<T>(dir: string, file: string, needs: string): Loaded<T> {
  const path = fileURLToPath(new URL(`../native/${dir}/build/Release/${file}.node`, import.meta.url));
  try {
    return { addon: createRequire(import.meta.url)(path) as T };
  } catch (err) {
    const missing = (err as NodeJS.ErrnoException).code === 'MODULE_NOT_FOUND';
    return { why: missing ? `native/${dir} is not built (scripts/build-native, needs ${needs})` : `native/${dir} does not load: ${(err as Error).message.split('\n')[0]}` };
  }
}
