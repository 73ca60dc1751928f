import { register, waitMonitoring, type MonitoredContainer } from '../xapi/index.js';
import type { StageContext } from './stage.js';

/** register: hand the Docker VM to XenServer container monitoring (xscontainer) over XAPI. */
export interface RegisterOptions {
  vm: string;
  xapi: string;
  ca?: string;
  insecure?: boolean;
  /** Wait until the monitor reports a container of the new image, at most this long. */
  waitMonitoringSeconds?: number;
}

export interface Registered {
  vm: string;
  xapi: string;
  monitor: 'True' | 'False';
  container?: MonitoredContainer;
  seconds?: number;
}

export async function registerStage(ctx: StageContext, opts: RegisterOptions, image: { id: string; tag?: string }): Promise<Registered> {
  const conn = { xapi: opts.xapi, vm: opts.vm, signal: ctx.signal, ...(opts.ca ? { ca: opts.ca } : {}), ...(opts.insecure ? { insecure: true } : {}) };
  const r = await register(conn);
  ctx.note(`VM ${r.vm} registered at ${r.xapi}`);
  if (opts.waitMonitoringSeconds === undefined) return r;
  ctx.note(`waiting up to ${opts.waitMonitoringSeconds} s for the monitor to report a container of ${image.tag ?? image.id}`);
  const w = await waitMonitoring({ ...conn, image: [image.id, ...(image.tag ? [image.tag] : [])], timeoutSeconds: opts.waitMonitoringSeconds });
  ctx.note(`monitor reports container ${w.container.id.slice(0, 12)} (${w.container.status}) after ${w.seconds.toFixed(1)} s`);
  return { ...r, container: w.container, seconds: w.seconds };
}
