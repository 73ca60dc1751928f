/**
 * What a run must undo, newest first: mounts before loop devices before temp dirs. Every step
 * runs even when an earlier one fails, so one stuck unmount does not leave a loop device behind.
 */
export class Cleanup {
  private steps: { label: string; fn: () => Promise<void>; onlyOnFailure: boolean }[] = [];
  /** Steps their owner runs early (a stage unmounting what it is done with), still under way. */
  private readonly early = new Set<Promise<void>>();
  private ran = false;

  /** Register an undo step; returns a function that runs it now (and forgets it). */
  defer(label: string, fn: () => Promise<void>): () => Promise<void> {
    return this.push(label, fn, false);
  }

  /** Register a step that runs only if the run fails (e.g. removing a half-made image). */
  onFailure(label: string, fn: () => Promise<void>): () => Promise<void> {
    return this.push(label, fn, true);
  }

  private push(label: string, fn: () => Promise<void>, onlyOnFailure: boolean): () => Promise<void> {
    if (this.ran) {
      // Made after the run was undone (a straggling stage): undo it at once.
      void fn().catch((err: unknown) => process.stderr.write(`ddk2docker: cleanup: ${label}: ${(err as Error).message}\n`));
      return async () => {};
    }
    const step = { label, fn, onlyOnFailure };
    this.steps.push(step);
    return async () => {
      const i = this.steps.indexOf(step);
      if (i === -1) return;
      this.steps.splice(i, 1);
      const running = fn();
      this.early.add(running);
      try {
        await running;
      } finally {
        this.early.delete(running);
      }
    };
  }

  /** Run every step, newest first; returns one line per step that failed. */
  async run(failed: boolean): Promise<string[]> {
    this.ran = true;
    // An unmount under way must end before the steps after it (removing the mount point) start.
    await Promise.allSettled([...this.early]);
    const failures: string[] = [];
    while (this.steps.length > 0) {
      const step = this.steps.pop()!;
      if (step.onlyOnFailure && !failed) continue;
      try {
        await step.fn();
      } catch (err) {
        failures.push(`${step.label}: ${(err as Error).message}`);
      }
    }
    return failures;
  }
}
