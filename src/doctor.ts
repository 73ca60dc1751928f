import { connect, daemonName, ping } from './docker/daemon.js';
import { libvirtLxcCheck } from './docker/libvirt.js';
import { run } from './host/exec.js';
import { isoMethod, partitionMethod, probeFacilities, type Facilities } from './host/facilities.js';
import { inflateChoice } from './pipeline/inflate-isal.js';
import { sha256Choice } from './stream-sha256.js';

/** What works on this machine, and why not: the answer to "which engine and output can I use here?" */
export interface Check {
  name: string;
  ok: boolean;
  detail: string;
}

export interface DoctorReport {
  engines: Check[];
  outputs: Check[];
  facilities: Check[];
}

function missing(f: Facilities, tools: string[]): string[] {
  return tools.filter((t) => !f.tools[t]);
}

export async function doctor(): Promise<DoctorReport> {
  const f = await probeFacilities();
  const iso = isoMethod(f);
  const part = partitionMethod(f);
  const hostTools = missing(f, ['zcat', 'dd', 'qemu-img', 'sfdisk', 'tar', 'mount', 'umount', 'blkid']);
  const gnuTar = f.tools.tar ? /GNU tar/.test(await run('tar', ['--version'], 'tar --version').catch(() => '')) : false;
  const hostProblems = [
    ...(iso.method ? [] : [`ISO: ${iso.why}`]),
    ...(part.method ? [] : [`partitions: ${part.why}`]),
    ...(hostTools.length ? [`missing tools: ${hostTools.join(', ')}`] : []),
    ...(f.tools.tar && !gnuTar ? ['tar is not GNU tar (needs --xattrs, --sort)'] : []),
  ];
  const engines: Check[] = [
    { name: 'builtin', ok: true, detail: 'in-process readers (ISO 9660, VHD, MBR/GPT, ext2/3/4): no root, no tools' },
    {
      name: 'host',
      ok: hostProblems.length === 0,
      detail: hostProblems.length ? hostProblems.join('; ') : `ISO via ${iso.why}; partitions via ${part.why}`,
    },
  ];
  if (hostProblems.length === 0 && (iso.method !== 'kernel' || part.method !== 'kpartx')) {
    engines[1]!.detail = `works with fallbacks: ISO via ${iso.why}; partitions via ${part.why}`;
  }
  let dockerOk = true;
  let dockerDetail = `daemon at ${daemonName()}`;
  try {
    const docker = connect();
    await ping(docker);
    const v = await docker.version();
    dockerDetail = `Docker ${v.Version} at ${daemonName()}`;
  } catch (err) {
    dockerOk = false;
    dockerDetail = (err as Error).message;
  }
  const outputs: Check[] = [
    { name: 'docker', ok: dockerOk, detail: dockerDetail },
    { name: 'docker-archive:FILE', ok: true, detail: 'no daemon needed (docker load)' },
    { name: 'oci:DIR', ok: true, detail: 'no daemon needed (OCI image layout)' },
    { name: 'rootfs:FILE.tar[.gz]', ok: true, detail: 'no daemon needed (plain root file system tarball)' },
    { name: 'libvirt-lxc:DIR', ...(await libvirtLxcCheck(gnuTar)) },
  ];
  const gunzip = inflateChoice();
  const sha256 = sha256Choice();
  const facilities: Check[] = [
    {
      name: 'ISA-L gunzip',
      ok: gunzip.kind === 'isal',
      detail: gunzip.kind === 'isal' ? 'the builtin engine gunzips chunks with ISA-L (native addon)' : `the builtin engine gunzips chunks with zlib, about 1.6 × slower: ${gunzip.why}`,
    },
    {
      name: 'sha256 thread',
      ok: sha256.kind === 'thread',
      detail: sha256.kind === 'thread' ? 'layers are hashed on a thread of their own (native addon)' : `layers are hashed on the main thread, the export's busiest: ${sha256.why}`,
    },
    { name: 'root', ok: f.root, detail: f.root ? 'running as root' : `running as uid ${process.getuid?.()}` },
    { name: 'loop devices', ok: f.loop, detail: f.loop ? '/dev/loop-control' : 'no /dev/loop-control' },
    { name: 'kernel iso9660', ok: f.kernelIso9660, detail: f.kernelIso9660 ? 'mount -t iso9660 works' : 'no iso9660 driver: mount -t iso9660 fails' },
    { name: 'FUSE', ok: f.fuse && !!f.tools.fuseiso, detail: f.fuse ? (f.tools.fuseiso ? 'fuseiso can mount ISOs' : '/dev/fuse present but fuseiso missing') : 'no /dev/fuse' },
    { name: 'device-mapper', ok: f.deviceMapper && !!f.tools.kpartx, detail: f.deviceMapper ? (f.tools.kpartx ? 'kpartx works' : 'kpartx missing') : 'no device-mapper: kpartx unavailable, using losetup --offset' },
  ];
  return { engines, outputs, facilities };
}
