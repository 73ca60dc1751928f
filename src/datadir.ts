import envPaths from 'env-paths';

/**
 * Where ddk2docker keeps what it learns across runs (the catalogue of conversions, sha256s recorded
 * on first fetch). DDK2DOCKER_DATA_DIR moves it, so tests and CI jobs keep theirs apart.
 */
export function dataDir(): string {
  return process.env.DDK2DOCKER_DATA_DIR || envPaths('ddk2docker', { suffix: '' }).data;
}
