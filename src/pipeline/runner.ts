import { Listr, ListrLogger, ProcessOutput, type ListrTaskWrapper } from 'listr2';
import type { Cleanup } from './cleanup.js';
import { Progress, type Engine, type StageContext, type StageName } from './stage.js';

export interface StageTiming {
  name: StageName;
  seconds: number;
  bytes: number;
}

export interface StageSpec {
  name: StageName;
  title: string;
  run(ctx: StageContext): Promise<void>;
}

/** A step is one stage, or stages that run at once (a producer and its consumer). */
export type Step = StageSpec | StageSpec[];

export type RendererKind = 'auto' | 'plain' | 'silent';

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
export function formatBytes(n: number): string {
  let u = 0;
  while (n >= 1024 && u < UNITS.length - 1) {
    n /= 1024;
    u++;
  }
  return `${n.toFixed(u === 0 ? 0 : 1)} ${UNITS[u]}`;
}

function formatSeconds(s: number): string {
  if (!Number.isFinite(s)) return '?';
  const m = Math.floor(s / 60);
  return m > 0 ? `${m}m${String(Math.round(s % 60)).padStart(2, '0')}s` : `${Math.round(s)}s`;
}

/** "1.2 GiB / 3.3 GiB, 180.0 MiB/s, ETA 12s" */
export function progressLine(p: Progress, seconds: number): string {
  if (p.done === 0) return '';
  const rate = seconds > 0 ? p.done / seconds : 0;
  const parts = [p.total ? `${formatBytes(p.done)} / ${formatBytes(p.total)}` : formatBytes(p.done), `${formatBytes(rate)}/s`];
  if (p.total && rate > 0 && p.done < p.total) parts.push(`ETA ${formatSeconds((p.total - p.done) / rate)}`);
  return parts.join(', ');
}

/**
 * Test hook: with DDK2DOCKER_TEST_HOLD=<stage>, that stage, its work done and all it made still
 * in place, waits until the run is aborted. Tests use it to interrupt any stage, however fast,
 * deterministically (test/e2e/interrupts.test.ts); it does nothing otherwise.
 */
function holdForTest(name: StageName, ctx: StageContext): Promise<void> {
  if (process.env.DDK2DOCKER_TEST_HOLD !== name) return Promise.resolve();
  ctx.note('held by DDK2DOCKER_TEST_HOLD until interrupted');
  // An abort listener does not keep the process alive; a timer does.
  const alive = setInterval(() => undefined, 60_000);
  return new Promise((_, reject) => {
    const stop = () => {
      clearInterval(alive);
      reject(ctx.signal.reason);
    };
    if (ctx.signal.aborted) stop();
    else ctx.signal.addEventListener('abort', stop, { once: true });
  });
}

/**
 * Run the steps as listr2 tasks on stderr (stdout stays free for --json): a live view on a
 * terminal, plain lines with progress every few seconds in CI logs. Every stage is timed.
 */
export async function runSteps(
  steps: Step[],
  base: { engine: Engine; signal: AbortSignal; cleanup: Cleanup; workdir: string; abort: (err: unknown) => void },
  renderer: RendererKind,
): Promise<StageTiming[]> {
  const timings: StageTiming[] = [];
  // Stages still running: a failed run waits for all of them before its cleanup starts, so no
  // mount or loop device is made after the cleanup has run.
  const running = new Set<Promise<void>>();
  const tty = renderer === 'auto' && process.stderr.isTTY === true;
  const logger = new ListrLogger({ processOutput: new ProcessOutput(process.stderr, process.stderr), useIcons: tty });

  const task = (spec: StageSpec) => ({
    title: spec.title,
    // Notes (which fallback was taken, what was found) stay on screen after the stage ends.
    rendererOptions: { persistentOutput: true } as never,
    task: async (_: unknown, t: ListrTaskWrapper<unknown, never, never>) => {
      // An interrupted run starts nothing more; runScoped reports the interruption.
      if (base.signal.aborted) return t.skip('stopped');
      const progress = new Progress();
      const notes: string[] = [];
      const started = performance.now();
      const elapsed = () => (performance.now() - started) / 1000;
      // A terminal redraws the notes and the live line; a log gets each note once and progress lines.
      const show = (note?: string) => {
        const line = progressLine(progress, elapsed());
        if (tty) t.output = [...notes, line].filter(Boolean).join('\n');
        else if (note) t.output = note;
        else if (line) t.output = line;
      };
      const timer = setInterval(() => show(), tty ? 200 : 5000);
      timer.unref();
      const ctx: StageContext = {
        ...base,
        progress,
        note: (text) => {
          notes.push(text);
          show(text);
        },
      };
      const run = spec.run(ctx).then(() => holdForTest(spec.name, ctx));
      running.add(run);
      let stopped = false;
      try {
        await run;
      } catch (err) {
        // A stage that only stopped because another failed (or the run was interrupted) is shown
        // as stopped: the failure is reported once, by the stage it happened in.
        stopped = base.signal.aborted && (err === base.signal.reason || (err as Error)?.name === 'AbortError');
        base.abort(err);
        if (!stopped) throw err;
      } finally {
        running.delete(run);
        clearInterval(timer);
        timings.push({ name: spec.name, seconds: Math.round(elapsed() * 1000) / 1000, bytes: progress.done });
      }
      if (stopped) return t.skip('stopped');
      const rate = progress.done > 0 ? ` (${formatBytes(progress.done)} in ${elapsed().toFixed(1)} s)` : ` (${elapsed().toFixed(1)} s)`;
      t.title = `${spec.title}${rate}`;
      if (tty) t.output = notes.join('\n');
    },
  });

  const list = new Listr(
    steps.map((step) =>
      Array.isArray(step)
        ? { title: step.map((s) => s.title).join(' → '), task: (_: unknown, t: ListrTaskWrapper<unknown, never, never>) => t.newListr(step.map(task), { concurrent: true, exitOnError: true }) }
        : task(step),
    ) as never,
    {
      concurrent: false,
      exitOnError: true,
      registerSignalListeners: false,
      renderer: renderer === 'silent' ? 'silent' : tty ? 'default' : 'simple',
      rendererOptions: { logger, collapseSubtasks: false, persistentOutput: true } as never,
      fallbackRenderer: 'simple',
      fallbackRendererOptions: { logger } as never,
      fallbackRendererCondition: () => !tty && renderer !== 'silent',
    },
  );
  try {
    await list.run();
  } catch (err) {
    await Promise.allSettled([...running]);
    throw err;
  }
  // Stages that run at once finish in any order: report them in the order they were given.
  const order = steps.flat().map((spec) => spec.name);
  return timings.sort((a, b) => order.indexOf(a.name) - order.indexOf(b.name));
}
