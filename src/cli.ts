#!/usr/bin/env -S node --max-semi-space-size=4
// A young generation of 2 × 4 MiB, not Node's 2 × 16 (and more) on a large machine: the layer's
// buffers die young, and a small nursery is collected often, so they are freed soon; peak RSS of a
// 2 GB conversion 205-215 -> 160-185 MiB, wall time unchanged. The Dockerfile passes it too.
import { Argument, Command, InvalidArgumentError, Option } from 'commander';
import { doctor, type Check } from './doctor.js';
import { CancelledError, printable } from './errors.js';
import { loadPipelines } from './declarative/file.js';
import { runPipelines, summaryTable } from './declarative/run.js';
import { formatBytes } from './pipeline/runner.js';
import { inspectSource, type InspectResult } from './pipeline/inspect.js';
import { convertDdk, defaultCacheDir, type ConvertResult } from './pipeline/pipeline.js';
import { describeVerification, verifyImage } from './pipeline/verify-image.js';
import { catalogueTable, listCatalogue } from './catalogue.js';
import { VERSION } from './version.js';
import { CONTAINER_ACTIONS, containerAction, deregister, listContainers, register, type ContainerAction } from './xapi/index.js';

const collect = (value: string, previous: string[]) => [...previous, value];

function parseLabel(value: string, previous: Record<string, string>): Record<string, string> {
  const eq = value.indexOf('=');
  if (eq <= 0) throw new InvalidArgumentError(`${JSON.stringify(value)} is not K=V`);
  return { ...previous, [value.slice(0, eq)]: value.slice(eq + 1) };
}

function parsePartition(value: string): number | 'auto' {
  if (value === 'auto') return 'auto';
  if (!/^[1-9]\d*$/.test(value)) throw new InvalidArgumentError('a partition number (1, 2, …) or auto');
  return Number(value);
}

/** One JSON-safe object: bigints are not expected, but keep output robust. */
function printJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v), 2)}\n`);
}

/** `seconds`: wall time; the stages overlap, so their times do not add up to it. */
function summary(r: ConvertResult, seconds: number): string {
  const where = r.image ? `image ${r.image.tag ?? r.image.id}${r.image.tag ? ` (${r.image.id.slice(0, 19)})` : ''}` : r.path ?? r.output;
  const pushed = r.pushed ? `; pushed ${r.pushed.ref}@${r.pushed.digest}` : '';
  const domain = r.libvirt ? `\ndomain ${r.libvirt.name}: ${r.libvirt.domainXml} (boots ${r.libvirt.init}; virsh -c lxc:/// define it)` : '';
  return `${where}: ${r.files} entries, ${formatBytes(r.bytes)}, ${r.diffId} in ${seconds.toFixed(1)} s${pushed}${domain}`;
}

/**
 * SIGINT/SIGTERM abort the run; the pipeline then undoes its mounts, loop devices, temp files and
 * half-imported image before the process exits. A second signal during cleanup is ignored.
 */
let received: NodeJS.Signals | undefined;

function abortOnSignals(): { signal: AbortSignal; dispose(): void } {
  const controller = new AbortController();
  const handler = (sig: NodeJS.Signals) => {
    if (!controller.signal.aborted) {
      received = sig;
      process.stderr.write(`\nddk2docker: ${sig}: stopping and cleaning up\n`);
      controller.abort(new CancelledError(sig));
    }
  };
  process.on('SIGINT', handler);
  process.on('SIGTERM', handler);
  return {
    signal: controller.signal,
    dispose: () => {
      process.off('SIGINT', handler);
      process.off('SIGTERM', handler);
    },
  };
}

function parseCount(value: string): number {
  if (!/^[1-9]\d*$/.test(value)) throw new InvalidArgumentError('a whole number ≥ 1');
  return Number(value);
}

function parseSeconds(value: string): number {
  if (!/^\d+(\.\d+)?$/.test(value)) throw new InvalidArgumentError('a number of seconds');
  return Number(value);
}

type XapiFlags = { vm: string; xapi: string; xapiCa?: string; insecure?: boolean; json?: boolean };

function xapiOptions(o: XapiFlags, signal: AbortSignal) {
  return { vm: o.vm, xapi: o.xapi, signal, ...(o.xapiCa ? { ca: o.xapiCa } : {}), ...(o.insecure ? { insecure: true } : {}) };
}

/** How to read the source: convert, inspect and verify take the same. */
function withSourceFlags(c: Command): Command {
  return c
    .option('--sha256 <hex>', 'expected sha256 of the source')
    .option('--partition <n|auto>', 'root partition number', parsePartition, 'auto' as const);
}

/** Scratch space, download cache and output form of every command that runs the stages. */
function withRunFlags(c: Command): Command {
  return c
    .option('--workdir <dir>', 'scratch space (default: the system temp dir)')
    .option('--cache-dir <dir>', 'download cache')
    .option('--json', 'print one JSON object on stdout (progress stays on stderr)')
    .option('--quiet', 'no progress output');
}

function withXapiFlags(c: Command): Command {
  return c
    .requiredOption('--vm <uuid>', "the Docker VM's uuid")
    .requiredOption('--xapi <url>', 'XAPI URL of any pool host (credentials: XAPI_USER / XAPI_PASSWORD)')
    .option('--xapi-ca <file>', "PEM certificate(s) to trust for XAPI's TLS")
    .option('--insecure', "do not verify XAPI's TLS certificate")
    .option('--json', 'print one JSON object');
}

/** Run an action with SIGINT/SIGTERM turned into an abort signal. */
async function withSignals<T>(fn: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const sig = abortOnSignals();
  try {
    return await fn(sig.signal);
  } finally {
    sig.dispose();
  }
}

function describeInspection(r: InspectResult): string {
  const lines = [`${r.source.name} (${r.source.kind}, ${formatBytes(r.source.size)}, sha256 ${r.source.sha256})`];
  if (r.ova) lines.push(`  ova.xml: ${r.ova.label || r.ova.vmName}, disk of ${r.ova.vdiSize} bytes; chunks ${r.ova.chunks.join(', ')}${r.ova.leftOut.length ? `; left out (all zeros): ${r.ova.leftOut.join(', ')}` : ''}`);
  if (r.xva) lines.push(`  XVA version 2: ${r.xva.vmName || 'unnamed VM'}, root disk ${r.xva.vdi} of ${r.xva.virtualSize} bytes; ${r.xva.blocks} blocks of 1 MiB with ${r.xva.checksums.join(' and ')} checksums, ${r.xva.leftOut} left out (all zeros)${r.xva.keepAlive ? `, ${r.xva.keepAlive} keep-alive` : ''}`);
  lines.push(`  disk: ${r.disk.payload}, ${r.disk.size} bytes, ${r.partitions.scheme} partition table`);
  for (const p of r.partitions.list) lines.push(`    ${p.index === r.root.index ? '*' : ' '} ${p.index}: type ${p.type} (${p.typeName}), offset ${p.offset}, ${formatBytes(p.size)}`);
  lines.push(`  root: partition ${r.root.index}, ${r.root.fs.type}, ${r.root.fs.blockSize}-byte blocks, label ${JSON.stringify(r.root.fs.label)}, features ${r.root.fs.features.join(' ')}`);
  if (r.release.redhatRelease) lines.push(`  /etc/redhat-release: ${r.release.redhatRelease}`);
  if (r.release.osRelease?.PRETTY_NAME) lines.push(`  /etc/os-release: ${r.release.osRelease.PRETTY_NAME}`);
  // Labels and release text come from the image: each line stays one line, with no escape sequences.
  return `${lines.map(printable).join('\n')}\n`;
}

function printChecks(title: string, checks: Check[]): void {
  process.stdout.write(`${title}\n`);
  for (const c of checks) process.stdout.write(`  ${c.ok ? 'ok  ' : 'no  '} ${c.name.padEnd(22)} ${c.detail}\n`);
}

const program = new Command('ddk2docker')
  .description('Turn a XenServer DDK ISO into a Docker base image')
  .version(VERSION)
  .showHelpAfterError('(ddk2docker --help for usage)')
  .configureOutput({ outputError: (str, write) => write(str) });

withRunFlags(withSourceFlags(program.command('convert')))
  .description('convert a DDK ISO, .vhd or raw disk image (path or http(s) URL) into an image')
  .argument('<source>', 'DDK ISO, .vhd, raw disk image, or an http(s) URL of one')
  .option('--tag <repo:tag>', 'name for the image (given only after it is verified)')
  .addOption(new Option('--engine <engine>', 'builtin: in-process, no root; host: mount/zcat/qemu-img/losetup/tar').choices(['builtin', 'host']).default('builtin'))
  .option('--output <target>', 'docker | docker-archive:FILE | oci:DIR | rootfs:FILE.tar[.gz] | libvirt-lxc:DIR (DIR/rootfs + DIR/domain.xml)', 'docker')
  .option('--change <instruction>', "Dockerfile instruction to apply, e.g. 'CMD [\"/bin/bash\"]' (repeatable)", collect, [] as string[])
  .option('--label <k=v>', 'image label (repeatable)', parseLabel, {} as Record<string, string>)
  .option('--smoke <cmd>', 'command that must succeed in a container from the image (default: cat /etc/redhat-release, skipped on the vfs storage driver)')
  .option('--no-smoke', 'run no smoke command (the layer digest and labels are still checked)')
  .option('--uname-shim', "add /usr/local/bin/uname reporting the DDK's kernel for -r (builds of kernel modules would see the host's)")
  .option('--keep-workdir', 'keep the scratch space for inspection')
  .option('--register-vm <uuid>', "register this Docker VM with XenServer container monitoring after import")
  .option('--xapi <url>', 'XAPI URL of a pool host, for --register-vm (credentials: XAPI_USER / XAPI_PASSWORD)')
  .option('--xapi-ca <file>', "PEM certificate(s) to trust for XAPI's TLS")
  .option('--insecure', "do not verify XAPI's TLS certificate")
  .option('--wait-monitoring <seconds>', 'after registering, wait until the monitor reports a container of the image', parseSeconds)
  .option('--push <registry/repo:tag>', 'push the verified image to a registry (credentials: REGISTRY_USER / REGISTRY_PASSWORD)')
  .option('--push-insecure', 'allow HTTP, or HTTPS without certificate checks, to the --push registry (loopback always is)')
  .action(async (source: string, o: Record<string, unknown>) => {
    if (o.registerVm && !o.xapi) throw new InvalidArgumentError('--register-vm needs --xapi URL');
    if (o.xapi && !o.registerVm) throw new InvalidArgumentError('--xapi goes with --register-vm UUID');
    if (o.waitMonitoring !== undefined && !o.registerVm) throw new InvalidArgumentError('--wait-monitoring goes with --register-vm UUID');
    if (o.pushInsecure && !o.push) throw new InvalidArgumentError('--push-insecure goes with --push REGISTRY/REPO:TAG');
    const started = performance.now();
    const result = await withSignals((signal) =>
      convertDdk({
        source,
        engine: o.engine as 'builtin' | 'host',
        output: o.output as string,
        partition: o.partition as number | 'auto',
        changes: o.change as string[],
        labels: o.label as Record<string, string>,
        ...(o.tag ? { tag: o.tag as string } : {}),
        ...(o.sha256 ? { sha256: o.sha256 as string } : {}),
        ...(o.smoke !== undefined ? { smoke: o.smoke as string | false } : {}),
        ...(o.unameShim ? { unameShim: true } : {}),
        ...(o.workdir ? { workdir: o.workdir as string } : {}),
        ...(o.cacheDir ? { cacheDir: o.cacheDir as string } : {}),
        keepWorkdir: Boolean(o.keepWorkdir),
        renderer: o.quiet ? 'silent' : 'auto',
        ...(o.push ? { push: o.push as string, ...(o.pushInsecure ? { pushInsecure: true } : {}) } : {}),
        ...(o.registerVm
          ? {
              register: {
                vm: o.registerVm as string,
                xapi: o.xapi as string,
                ...(o.xapiCa ? { ca: o.xapiCa as string } : {}),
                ...(o.insecure ? { insecure: true } : {}),
                ...(o.waitMonitoring !== undefined ? { waitMonitoringSeconds: o.waitMonitoring as number } : {}),
              },
            }
          : {}),
        signal,
      }),
    );
    if (o.json) printJson(result);
    else {
      process.stdout.write(`${summary(result, (performance.now() - started) / 1000)}\n`);
      for (const w of result.libvirt?.warnings ?? []) process.stderr.write(`ddk2docker: warning: ${w}\n`);
    }
  });

withRunFlags(withSourceFlags(program.command('inspect')))
  .description('what a DDK ISO, .vhd or disk image holds: ova.xml, chunks, disk format, partitions, file system, release')
  .argument('<source>', 'DDK ISO, .vhd, raw disk image, or an http(s) URL of one')
  .action(async (source: string, o: Record<string, unknown>) => {
    const r = await withSignals((signal) =>
      inspectSource({
        source,
        cacheDir: (o.cacheDir as string | undefined) ?? defaultCacheDir(),
        partition: o.partition as number | 'auto',
        ...(o.sha256 ? { sha256: o.sha256 as string } : {}),
        ...(o.workdir ? { workdir: o.workdir as string } : {}),
        renderer: o.quiet ? 'silent' : 'auto',
        signal,
      }),
    );
    if (o.json) printJson(r);
    else process.stdout.write(describeInspection(r));
  });

withRunFlags(program.command('run'))
  .description('run declarative pipelines (pipelines/*.yaml): one conversion per file, then a summary table')
  .argument('<pipeline...>', 'pipeline YAML files')
  .option('--concurrency <n>', 'conversions at once', parseCount, 1)
  .option('--fail-fast', 'stop the other pipelines at the first failure')
  .action(async (files: string[], o: { concurrency: number; failFast?: boolean; workdir?: string; cacheDir?: string; json?: boolean; quiet?: boolean }) => {
    const specs = await loadPipelines(files);
    const n = specs.length;
    const say = (line: string) => o.quiet || process.stderr.write(`${line}\n`);
    await withSignals(async (signal) => {
      const outcomes = await runPipelines(specs, {
        concurrency: o.concurrency,
        failFast: Boolean(o.failFast),
        ...(o.workdir ? { workdir: o.workdir } : {}),
        ...(o.cacheDir ? { cacheDir: o.cacheDir } : {}),
        // One at a time, the live stage view is readable; several at once would garble it.
        renderer: o.quiet || o.concurrency > 1 ? 'silent' : 'auto',
        signal,
        onStart: (s, i) => say(`[${i + 1}/${n}] ${s.name}: started (${s.file})`),
        onEnd: (r, i) => say(`[${i + 1}/${n}] ${r.name}: ${r.status} in ${r.seconds.toFixed(1)} s${r.error ? `: ${r.error}` : ''}`),
      });
      // The summary also after SIGINT: it says which pipelines finished before the stop.
      if (o.json) printJson({ ok: outcomes.every((r) => r.status === 'ok'), pipelines: outcomes });
      else process.stdout.write(summaryTable(outcomes));
      if (signal.aborted) throw new CancelledError();
      if (outcomes.some((r) => r.status !== 'ok')) process.exitCode = 1;
    });
  });

withRunFlags(withSourceFlags(program.command('verify')))
  .description("compare an image's files, layer diffID and source labels with the disk it was converted from; exit 0 only when equal")
  .argument('<source>', 'DDK ISO, .vhd, raw disk image, or an http(s) URL of one')
  .requiredOption('--image <ref>', 'image in the daemon at DOCKER_HOST, docker-archive:FILE or oci:DIR')
  .addOption(new Option('--engine <engine>', 'how to read the disk (as for convert)').choices(['builtin', 'host']).default('builtin'))
  .action(async (source: string, o: Record<string, unknown>) => {
    const r = await withSignals((signal) =>
      verifyImage({
        source,
        image: o.image as string,
        engine: o.engine as 'builtin' | 'host',
        partition: o.partition as number | 'auto',
        cacheDir: (o.cacheDir as string | undefined) ?? defaultCacheDir(),
        ...(o.sha256 ? { sha256: o.sha256 as string } : {}),
        ...(o.workdir ? { workdir: o.workdir as string } : {}),
        renderer: o.quiet ? 'silent' : 'auto',
        signal,
      }),
    );
    if (o.json) printJson(r);
    else process.stdout.write(describeVerification(r));
    if (!r.equal) process.exitCode = 1;
  });

program
  .command('ls')
  .description('every conversion made on this machine (the catalogue), and whether its image or file is still there')
  .option('--json', 'print a JSON array')
  .action(async (o: { json?: boolean }) => {
    const entries = await listCatalogue();
    if (o.json) printJson(entries);
    else process.stdout.write(catalogueTable(entries));
  });

program
  .command('doctor')
  .description('which engines and outputs work on this machine, and why not')
  .option('--json', 'print one JSON object')
  .action(async (o: { json?: boolean }) => {
    const report = await doctor();
    if (o.json) return printJson(report);
    printChecks('Engines', report.engines);
    printChecks('Outputs', report.outputs);
    printChecks('This machine', report.facilities);
  });

for (const name of ['register', 'deregister'] as const) {
  withXapiFlags(program.command(name).description(`${name} a Docker VM with XenServer container monitoring (xscontainer)`)).action(async (o: XapiFlags) => {
    const r = await withSignals((signal) => (name === 'register' ? register : deregister)(xapiOptions(o, signal)));
    if (o.json) printJson(r);
    else process.stdout.write(`VM ${r.vm}: xscontainer-monitor=${r.monitor} (pool master ${r.xapi})\n`);
  });
}

withXapiFlags(program.command('containers').description("the VM's containers as xscontainer's monitor reports them")).action(async (o: XapiFlags) => {
  const list = await withSignals((signal) => listContainers(xapiOptions(o, signal)));
  if (o.json) return printJson(list);
  for (const c of list) process.stdout.write(`${c.id.slice(0, 12)}  ${c.image.padEnd(30)} ${c.status.padEnd(12)} ${c.names.padEnd(20)} ${c.command}\n`);
});

withXapiFlags(
  program
    .command('container')
    .description('start|stop|restart|pause|unpause a container in the VM through xscontainer')
    .addArgument(new Argument('<action>').choices(CONTAINER_ACTIONS))
    .argument('<container>', 'container id or name'),
).action(async (action: ContainerAction, container: string, o: XapiFlags) => {
  const r = await withSignals((signal) => containerAction(action, { ...xapiOptions(o, signal), container }));
  if (o.json) printJson(r);
  else process.stdout.write(`${action} ${container}: done\n`);
});

// The event loop ran dry with the command unfinished (a promise that nothing can settle any more):
// that must never pass for success, whatever Node would exit with.
let finished = false;
process.once('beforeExit', () => {
  if (finished) return;
  process.stderr.write('ddk2docker: internal error: the command stopped before it finished\n');
  process.exitCode = 1;
});

try {
  await program.parseAsync();
  finished = true;
} catch (err) {
  finished = true;
  const e = err as Error;
  const msg = (e.message || String(err)).split('\n')[0];
  process.stderr.write(`ddk2docker: ${msg}\n`);
  if (process.env.DDK2DOCKER_DEBUG) process.stderr.write(`${e.stack}\n`);
  // As a shell reports a death by that signal: 128 + 2 (SIGINT) or 128 + 15 (SIGTERM).
  process.exitCode = err instanceof CancelledError ? (received === 'SIGTERM' ? 143 : 130) : 1;
}
