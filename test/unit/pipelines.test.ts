import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadPipelines, parsePipeline } from '../../src/declarative/file.js';
import { InputError } from '../../src/errors.js';
import { recordedSha256, recordedSha256File, recordSha256 } from '../../src/recorded-sha256.js';

const PIPELINES = fileURLToPath(new URL('../../pipelines/', import.meta.url));
const SHA = 'ab'.repeat(32);

/** The one-line message parsePipeline throws for `text`. */
function problem(text: string, file = 'dir/p.yaml'): string {
  try {
    parsePipeline(file, text);
  } catch (err) {
    expect(err).toBeInstanceOf(InputError);
    return (err as Error).message;
  }
  throw new Error('the pipeline was accepted');
}

describe('pipeline files', () => {
  it('every file in pipelines/ validates, with distinct names and tags', async () => {
    const files = (await readdir(PIPELINES)).filter((f) => f.endsWith('.yaml')).map((f) => join(PIPELINES, f));
    expect(files.length).toBeGreaterThanOrEqual(14);
    const specs = await loadPipelines(files);
    for (const s of specs) {
      expect(s.tag, s.file).toMatch(/^xenserver-ddk:\d+\.\d+$/);
      expect(s.changes, s.file).toEqual(['CMD ["/bin/bash"]']);
      expect(s.labels['org.opencontainers.image.version'], s.file).toMatch(/^\d+\.\d+\.\d+$/);
      expect(s.smoke, s.file).toBeTruthy();
      expect(s.source.startsWith('http://') || s.source.startsWith(PIPELINES), s.file).toBe(true);
    }
    expect(new Set(specs.map((s) => s.tag)).size).toBe(specs.length);
  });

  it('fills defaults and resolves relative paths against the file', () => {
    const s = parsePipeline('dir/p.yaml', 'source: ddk.iso\noutput: rootfs:out/root.tar\nsha256: sha256:' + SHA.toUpperCase() + '\n');
    expect(s).toMatchObject({ name: 'p', engine: 'builtin', partition: 'auto', changes: [], labels: {}, sha256: SHA });
    expect(s.source).toBe(resolve('dir/ddk.iso'));
    expect(s.output).toBe(`rootfs:${resolve('dir/out/root.tar')}`);
    expect(parsePipeline('p.yaml', 'source: https://example.com/x.iso\n').source).toBe('https://example.com/x.iso');
  });

  it('an unknown key is an error naming the file, line and field', () => {
    expect(problem('source: a.iso\ntag: ddk:1\ntgas: x\n')).toMatch(/^dir\/p\.yaml: line 3: tgas: unknown field \(known: name, source, /);
  });

  it('a bad sha256 names the field and its line', () => {
    expect(problem('source: a.iso\n\nsha256: abc123\n')).toBe('dir/p.yaml: line 3: sha256: not a sha256 (64 hex digits)');
  });

  it('nested fields: label values, changes, partition, tag, output', () => {
    expect(problem('source: a.iso\nlabels:\n  a: x\n  version: 6.10\n')).toMatch(/^dir\/p\.yaml: line 4: labels\.version: a label value must be a string: quote it/);
    expect(problem('source: a.iso\nlabels:\n  org.example.v: 1\n')).toMatch(/line 3: labels\["org\.example\.v"\]: a label value must be a string/);
    expect(problem('source: a.iso\nchanges:\n  - CMD ["/bin/bash"]\n  - RUN make\n')).toMatch(/line 4: changes\[1\]: .*RUN/);
    expect(problem('source: a.iso\npartition: 0\n')).toBe('dir/p.yaml: line 2: partition: a partition number (1, 2, …) or auto');
    expect(problem('source: a.iso\ntag: Bad:Tag\n')).toMatch(/line 2: tag: .*not a valid repository name/);
    expect(problem('source: a.iso\noutput: tape:x\n')).toMatch(/line 2: output: .*unknown output kind "tape"/);
    expect(problem('source: a.iso\nengine: magic\n')).toMatch(/line 2: engine: Invalid enum value/);
    expect(problem('source: a.iso\npush: localhost:5000/Bad:1\n')).toMatch(/line 2: push: .*not a valid repository name/);
    expect(parsePipeline('p.yaml', 'source: a.iso\npush: localhost:5000/ddk:6.2\n').push).toBe('localhost:5000/ddk:6.2');
  });

  it('a missing source, a non-mapping, an ftp URL and broken YAML are errors with a line', () => {
    expect(problem('tag: ddk:1\n')).toBe('dir/p.yaml: line 1: source: required');
    expect(problem('- a\n- b\n')).toBe('dir/p.yaml: line 1: expected a mapping of pipeline fields, got array');
    expect(problem('')).toBe('dir/p.yaml: line 1: expected a mapping of pipeline fields, got null');
    expect(problem('source: ftp://example.com/a.iso\n')).toBe('dir/p.yaml: line 1: source: only http(s) URLs and file paths are fetched');
    expect(problem('source: a.iso\nlabels:\n  a: x\n  a: y\n')).toBe('dir/p.yaml: line 4: Map keys must be unique');
    expect(problem('source: a.iso\ntag: [\n')).toMatch(/^dir\/p\.yaml: line \d+: /);
  });

  it('several problems are reported together, and files that would overwrite each other are refused', async () => {
    expect(problem('source: a.iso\nsha256: x\nsmok: y\n')).toMatch(/line 3: smok: unknown field .*; line 2: sha256: not a sha256|line 2: sha256: not a sha256.*; line 3: smok: unknown field/);
    const dir = await mkdtemp(join(tmpdir(), 'pipelines-'));
    try {
      await writeFile(join(dir, 'a.yaml'), 'source: a.iso\ntag: ddk:1\n');
      await writeFile(join(dir, 'b.yaml'), 'source: b.iso\ntag: ddk:1\n');
      await writeFile(join(dir, 'c.yaml'), 'source: c.iso\nbad: 1\n');
      await expect(loadPipelines([join(dir, 'a.yaml'), join(dir, 'b.yaml')])).rejects.toThrow(/b\.yaml: tag ddk:1 is also used by .*a\.yaml/);
      await expect(loadPipelines([join(dir, 'c.yaml'), join(dir, 'missing.yaml')])).rejects.toThrow(/^2 pipeline files: .*c\.yaml: line 2: bad: unknown field.* \| .*missing\.yaml: no such file$/);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe('sha256s recorded on first fetch', () => {
  let dir: string;
  const saved = process.env.DDK2DOCKER_DATA_DIR;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'recorded-'));
    process.env.DDK2DOCKER_DATA_DIR = join(dir, 'data');
  });
  afterAll(async () => {
    if (saved === undefined) delete process.env.DDK2DOCKER_DATA_DIR;
    else process.env.DDK2DOCKER_DATA_DIR = saved;
    await rm(dir, { recursive: true, force: true });
  });

  it('records once, keeps the first value, and loses no entry when many record at once', async () => {
    expect(await recordedSha256('http://x/a.iso')).toBeUndefined();
    const first = { sha256: SHA, recorded: '2026-01-01T00:00:00.000Z', pipeline: 'a.yaml' };
    expect(await recordSha256('http://x/a.iso', first)).toBe(first);
    const kept = await recordSha256('http://x/a.iso', { ...first, sha256: 'cd'.repeat(32), pipeline: 'b.yaml' });
    expect(kept).toEqual(first);
    await Promise.all(Array.from({ length: 20 }, (_, i) => recordSha256(`http://x/${i}.iso`, { ...first, pipeline: `${i}.yaml` })));
    for (let i = 0; i < 20; i++) expect((await recordedSha256(`http://x/${i}.iso`))?.pipeline).toBe(`${i}.yaml`);
    expect((await readdir(join(dir, 'data'))).sort()).toEqual(['recorded-sha256.json']);
  });

  it('a damaged record file stops the run instead of being replaced', async () => {
    await writeFile(recordedSha256File(), '{"version": 1, "sources": {"u": {"sha256": "nothex"}}}');
    await expect(recordedSha256('u')).rejects.toThrow(/recorded-sha256\.json: not a file of recorded sha256s/);
    await writeFile(recordedSha256File(), '{');
    await expect(recordSha256('u', { sha256: SHA, recorded: 'now', pipeline: 'p' })).rejects.toThrow(/not a file of recorded sha256s/);
  });
});
