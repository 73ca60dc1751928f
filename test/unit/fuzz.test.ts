import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gunzipSync, gzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InputError } from '../../src/errors.js';
import {
  DEFAULT_CASE, Image, buildCorpus, formatReport, fuzz, regressionName, runCase, runOn, targetOfRegression, type CaseResult, type Target,
} from '../helpers/fuzz.js';

// Corrupt input must end in success or one InputError naming the input: never another error, a
// read outside the image, a hang or unbounded memory. CI runs 5000 cases of a fixed seed, or what
// fits in 45 s; scripts/fuzz runs longer with any seed (FUZZ_SECONDS, FUZZ_SEED), or replays one
// case (FUZZ_TARGET, FUZZ_CASE).

const env = process.env;
const SEED = Number(env.FUZZ_SEED ?? 20240601);
const LONG_RUN = env.FUZZ_SECONDS !== undefined;
const SECONDS = Number(env.FUZZ_SECONDS ?? 45);
const MAX_CASES = LONG_RUN ? undefined : 5000;
const ONLY = env.FUZZ_TARGET ? new RegExp(`^(?:${env.FUZZ_TARGET})$`) : undefined;
const REGRESSIONS = fileURLToPath(new URL('../fixtures/fuzz-regressions/', import.meta.url));
/** Where inputs of findings go: the regression directory with FUZZ_SAVE=1, else a temp dir. */
const FINDINGS = env.FUZZ_SAVE ? REGRESSIONS : join(tmpdir(), 'ddk2docker-fuzz-findings');
const MAX_RSS = 1.5 * 2 ** 30;

let dir: string;
let targets: Target[];

beforeAll(async () => {
  dir = await mkdtemp(join(env.TMPDIR ?? tmpdir(), 'fuzz-'));
  targets = await buildCorpus(dir);
});

afterAll(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

function byName(name: string): Target {
  const t = targets.find((x) => x.name === name);
  if (!t) throw new Error(`no fuzz target ${name}`);
  return t;
}

async function save(f: CaseResult): Promise<string> {
  await mkdir(FINDINGS, { recursive: true });
  const path = join(FINDINGS, regressionName(f));
  await writeFile(path, gzipSync(f.input!, { level: 9 }));
  return path;
}

function describeFinding(f: CaseResult, path: string): string {
  return `${f.target} seed ${f.seed} case ${f.index} (replay: scripts/fuzz --seed ${f.seed} --target ${f.target} --case ${f.index}; input ${path})\n` +
    `  mutations: ${f.log.join('; ')}\n  ${f.message}`;
}

describe('fuzz', () => {
  it('counts a crash, a read outside the image, a hang, an error not naming the input and a message with raw control characters as findings', async () => {
    const base = Buffer.alloc(4096);
    const fake = (run: Target['run']): Target => ({ name: 'self/test', input: 'self.img', base, regions: [], all: [], pointers: {}, run });
    const judge = (run: Target['run']) => runOn(fake(run), new Image(base), { caseMs: 300, cap: 1 << 20 });
    expect(await judge(async () => {
      throw new TypeError('boom');
    })).toMatchObject({ kind: 'finding', message: expect.stringMatching(/^TypeError: boom/) });
    expect(await judge(async (src) => {
      await src.read(4000, 200);
    })).toMatchObject({ kind: 'finding', message: expect.stringMatching(/^read outside the image/) });
    expect(await judge(() => new Promise(() => undefined))).toMatchObject({ kind: 'finding', message: expect.stringMatching(/no result within 300 ms/) });
    expect(await judge(async () => {
      throw new InputError('other.img', 'bad');
    })).toMatchObject({ kind: 'finding', message: expect.stringMatching(/does not name the input/) });
    expect(await judge(async () => {
      throw new InputError('self.img', 'two\nlines\x1b[1m');
    })).toEqual({ kind: 'input-error', message: 'self.img: two\\x0alines\\x1b[1m' });
    expect(await judge(async () => {
      const e = new InputError('self.img', 'x');
      Object.defineProperty(e, 'message', { value: 'self.img: two\nlines' });
      throw e;
    })).toMatchObject({ kind: 'finding', message: expect.stringMatching(/raw control characters/) });
    expect(await judge(async () => {
      throw new InputError('self.img partition 1', 'bad');
    })).toEqual({ kind: 'input-error', message: 'self.img partition 1: bad' });
    expect(await judge(async (_src, ctx) => ctx.stop())).toEqual({ kind: 'capped' });
  });

  it('reads every unmutated input through its whole pipeline', async () => {
    for (const t of targets) {
      const r = await runOn(t, new Image(t.base), DEFAULT_CASE);
      expect(r, t.name).toEqual({ kind: 'ok' });
    }
  });

  it('replays the saved regression inputs', async () => {
    const files = (await readdir(REGRESSIONS)).filter((f) => f.endsWith('.gz'));
    for (const file of files) {
      const t = byName(targetOfRegression(file));
      const r = await runOn(t, new Image(gunzipSync(await readFile(join(REGRESSIONS, file)))), DEFAULT_CASE);
      expect(['ok', 'capped', 'input-error'], `${file}: ${r.message}`).toContain(r.kind);
    }
  });

  it.runIf(env.FUZZ_CASE !== undefined)('replays one case', async () => {
    const r = await runCase(byName(env.FUZZ_TARGET ?? ''), SEED, Number(env.FUZZ_CASE));
    console.log(`${r.target} seed ${r.seed} case ${r.index}: ${r.kind} in ${r.ms.toFixed(0)} ms\n  mutations: ${r.log.join('; ')}\n  ${r.message ?? ''}`);
    if (r.input) console.log(`  input saved to ${await save(r)}`);
    expect(r.kind).not.toBe('finding');
  });

  it.runIf(env.FUZZ_CASE === undefined)('mutated superblocks, descriptors, inodes, extents, directories, xattrs, VHD, MBR/GPT, ISO, tar and ova.xml end in success or an InputError', async () => {
    const chosen = ONLY ? targets.filter((t) => ONLY.test(t.name)) : targets;
    expect(chosen.length).toBeGreaterThan(0);
    const saved: string[] = [];
    const report = await fuzz(chosen, {
      ...DEFAULT_CASE,
      seed: SEED,
      seconds: SECONDS,
      maxCases: MAX_CASES,
      hangMs: 20_000,
      reportFile: join(tmpdir(), 'ddk2docker-fuzz-hang.txt'),
      onFinding: async (f) => {
        saved.push(describeFinding(f, await save(f)));
      },
    });
    console.log(formatReport(report));
    expect(saved, saved.join('\n\n')).toEqual([]);
    expect(report.maxRssBytes).toBeLessThan(MAX_RSS);
    if (!LONG_RUN && !ONLY) {
      expect(report.cases).toBeGreaterThanOrEqual(1500);
      for (const [name, s] of report.perTarget) expect(s.cases, name).toBeGreaterThanOrEqual(20);
    }
  }, (SECONDS + 60) * 1000);
});
