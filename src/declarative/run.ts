import { CancelledError, InputError } from '../errors.js';
import { convertDdk, type ConvertResult } from '../pipeline/pipeline.js';
import type { RendererKind } from '../pipeline/runner.js';
import { recordedSha256, recordedSha256File, recordSha256 } from '../recorded-sha256.js';
import type { PipelineSpec } from './file.js';

/**
 * How the source's bytes were checked: against the pipeline's own sha256 (`pinned`), against the
 * one recorded on an earlier first fetch (`verified`), or not at all because this was the first
 * fetch (`recorded`: trusted on first use, and said so). `mismatch`: the bytes differ from the
 * expected sha256. `unchecked`: the run ended before the source was checked.
 */
export type Sha256Status = 'pinned' | 'verified' | 'recorded' | 'mismatch' | 'unchecked';

export interface PipelineOutcome {
  name: string;
  file: string;
  status: 'ok' | 'failed' | 'cancelled' | 'skipped';
  seconds: number;
  sha256: { status: Sha256Status; value?: string; recordFile?: string };
  error?: string;
  result?: ConvertResult;
}

export interface RunOptions {
  /** Conversions at once (each is CPU and disk heavy). */
  concurrency: number;
  /** Stop the others at the first failure. */
  failFast?: boolean;
  cacheDir?: string;
  workdir?: string;
  renderer?: RendererKind;
  signal?: AbortSignal;
  onStart?(spec: PipelineSpec, index: number): void;
  onEnd?(outcome: PipelineOutcome, index: number): void;
}

const round = (s: number) => Math.round(s * 10) / 10;

async function runOne(spec: PipelineSpec, opts: RunOptions, signal: AbortSignal): Promise<PipelineOutcome> {
  const started = performance.now();
  const outcome = (o: Omit<PipelineOutcome, 'name' | 'file' | 'seconds'>): PipelineOutcome => ({ name: spec.name, file: spec.file, seconds: round((performance.now() - started) / 1000), ...o });
  let expected: { sha256: string; status: 'pinned' | 'verified'; recorded?: string } | undefined;
  try {
    if (spec.sha256) expected = { sha256: spec.sha256, status: 'pinned' };
    else {
      const rec = await recordedSha256(spec.source);
      if (rec) expected = { sha256: rec.sha256, status: 'verified', recorded: `recorded on its first fetch (${rec.recorded}, by ${rec.pipeline})` };
    }
    const result = await convertDdk({
      source: spec.source,
      engine: spec.engine,
      output: spec.output,
      partition: spec.partition,
      changes: spec.changes,
      labels: spec.labels,
      ...(spec.tag ? { tag: spec.tag } : {}),
      ...(spec.smoke ? { smoke: spec.smoke } : {}),
      ...(spec.unameShim ? { unameShim: true } : {}),
      ...(spec.push ? { push: spec.push } : {}),
      ...(expected ? { sha256: expected.sha256 } : {}),
      ...(opts.cacheDir ? { cacheDir: opts.cacheDir } : {}),
      ...(opts.workdir ? { workdir: opts.workdir } : {}),
      renderer: opts.renderer ?? 'silent',
      signal,
    });
    const observed = result.source.sha256;
    if (expected) return outcome({ status: 'ok', sha256: { status: expected.status, value: observed }, result });
    const mine = { sha256: observed, recorded: new Date().toISOString(), pipeline: spec.file };
    const kept = await recordSha256(spec.source, mine);
    if (kept.sha256 !== observed) {
      // Another pipeline fetching the same source at the same time got different bytes.
      const error = `${spec.source}: fetched with sha256 ${observed}, but ${kept.pipeline} recorded ${kept.sha256} on its first fetch (${kept.recorded}) in ${recordedSha256File()}: the source changed while it was being fetched`;
      return outcome({ status: 'failed', sha256: { status: 'mismatch', value: observed, recordFile: recordedSha256File() }, error, result });
    }
    return outcome({ status: 'ok', sha256: { status: kept === mine ? 'recorded' : 'verified', value: observed, recordFile: recordedSha256File() }, result });
  } catch (err) {
    if (err instanceof CancelledError || signal.aborted) return outcome({ status: 'cancelled', sha256: { status: 'unchecked' }, error: 'stopped before it finished' });
    const message = (err as Error).message;
    // fetch's mismatch error names both digests: the expected one tells which check failed.
    if (expected && err instanceof InputError && /sha256 mismatch/.test(message) && message.includes(expected.sha256)) {
      const error =
        expected.status === 'pinned'
          ? `${message} (the sha256 given in ${spec.file})`
          : `${message}: ${expected.sha256} is the sha256 ${expected.recorded} in ${recordedSha256File()}, so the source has changed since; if the new file is genuine, put its published sha256 in ${spec.file} or remove the entry from ${recordedSha256File()}`;
      return outcome({ status: 'failed', sha256: { status: 'mismatch' }, error });
    }
    return outcome({ status: 'failed', sha256: { status: 'unchecked' }, error: message });
  }
}

/**
 * Run the pipelines, at most `concurrency` at once, each to its own end: one failing does not
 * stop the others unless `failFast`. An abort of `signal` (SIGINT) stops them all; each cleans up
 * after itself (runScoped) and those not started are skipped. Never throws for a pipeline's failure.
 */
export async function runPipelines(specs: PipelineSpec[], opts: RunOptions): Promise<PipelineOutcome[]> {
  if (!Number.isInteger(opts.concurrency) || opts.concurrency < 1) throw new InputError('--concurrency', `${opts.concurrency} is not a whole number ≥ 1`);
  const stop = new AbortController();
  const signal = opts.signal ? AbortSignal.any([opts.signal, stop.signal]) : stop.signal;
  const outcomes: PipelineOutcome[] = new Array(specs.length);
  let next = 0;
  const worker = async () => {
    while (next < specs.length) {
      const i = next++;
      const spec = specs[i]!;
      if (signal.aborted) {
        outcomes[i] = { name: spec.name, file: spec.file, status: 'skipped', seconds: 0, sha256: { status: 'unchecked' }, error: 'not started' };
      } else {
        opts.onStart?.(spec, i);
        outcomes[i] = await runOne(spec, opts, signal);
        if (opts.failFast && outcomes[i]!.status === 'failed') stop.abort(new CancelledError('--fail-fast'));
      }
      opts.onEnd?.(outcomes[i]!, i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(opts.concurrency, specs.length) }, worker));
  return outcomes;
}

function shortDiffId(r: ConvertResult | undefined): string {
  return r ? r.diffId.replace(/^sha256:/, '').slice(0, 12) : '-';
}

function destination(o: PipelineOutcome): string {
  const r = o.result;
  if (!r) return '-';
  return r.image ? (r.image.tag ?? r.image.id.slice(0, 19)) : (r.path ?? r.output);
}

/** The summary table and, under it, what needs attention: failures and sha256s trusted on first use. */
export function summaryTable(outcomes: PipelineOutcome[]): string {
  const header = ['PIPELINE', 'STATUS', 'TAG/OUTPUT', 'DIFFID', 'SHA256', 'SECONDS'];
  const rows = outcomes.map((o) => [o.name, o.status, destination(o), shortDiffId(o.result), o.sha256.status, o.seconds.toFixed(1)]);
  const widths = header.map((h, c) => Math.max(h.length, ...rows.map((r) => r[c]!.length)));
  const line = (cells: string[]) => cells.map((cell, c) => (c === cells.length - 1 ? cell.padStart(widths[c]!) : cell.padEnd(widths[c]!))).join('  ');
  const out = [line(header), ...rows.map(line)];
  const notes: string[] = [];
  for (const o of outcomes) {
    if (o.sha256.status === 'recorded') notes.push(`${o.name}: sha256 recorded on first fetch: ${o.sha256.value} (not verified against a published value; add it to ${o.file} as sha256)`);
    if (o.result?.pushed) notes.push(`${o.name}: pushed ${o.result.pushed.ref}@${o.result.pushed.digest}`);
    if (o.status === 'failed') notes.push(`${o.name}: failed: ${o.error}`);
  }
  const ok = outcomes.filter((o) => o.status === 'ok').length;
  out.push('', `${ok} of ${outcomes.length} pipelines succeeded`, ...notes);
  return `${out.join('\n')}\n`;
}
