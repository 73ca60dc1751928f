import { InputError } from '../errors.js';
import type { Architecture } from '../docker/image.js';
import type { AddedFile } from '../formats/tar.js';
import type { RootProbe } from './probe.js';

/**
 * `--uname-shim`: a `uname` that answers as the DDK's Dom0 kernel would. A container shares the
 * host's kernel, so `uname -r` names the host's release and builds of kernel modules (Makefiles
 * using /lib/modules/$(uname -r)/build) look for headers the image does not have; `uname -m` of a
 * 32-bit DDK on an x86_64 host would make the kernel's Makefile pick a 64-bit build. The shim
 * is one file added to the layer; everything it does not know goes to the real /bin/uname.
 */

export const UNAME_SHIM_PATH = '/usr/local/bin/uname';

/** What `uname -m` says on the Dom0 of each platform. */
const MACHINE: Record<Architecture, string> = { '386': 'i686', amd64: 'x86_64' };

/**
 * A POSIX sh script: -r and -m give the DDK's values, the other fields come from the real uname
 * one by one, in uname's order (s n r v m p i o); -a prints them all, leaving out p and i when
 * unknown as GNU uname does. Any other argument (--help, --version, a bad option) runs the real
 * uname with all the arguments unchanged. `release` and `machine` are plain version text (the
 * probe admits no quote), so single quotes hold them safely.
 */
export function unameShimScript(release: string, machine: string): string {
  return `#!/bin/sh
# Added by ddk2docker --uname-shim: uname as the DDK's Dom0 kernel answers it (release and
# machine below); every other field, and any option not listed here, comes from /bin/uname.
release='${release}'
machine='${machine}'
real=/bin/uname
fields=
for arg in "$@"; do
  case $arg in
    --all) fields="\${fields}a" ;;
    --kernel-name) fields="\${fields}s" ;;
    --nodename) fields="\${fields}n" ;;
    --kernel-release) fields="\${fields}r" ;;
    --kernel-version) fields="\${fields}v" ;;
    --machine) fields="\${fields}m" ;;
    --processor) fields="\${fields}p" ;;
    --hardware-platform) fields="\${fields}i" ;;
    --operating-system) fields="\${fields}o" ;;
    -*[!asnrvmpio]* | - | [!-]*) exec "$real" "$@" ;;
    -*) fields="$fields\${arg#-}" ;;
  esac
done
[ -n "$fields" ] || fields=s
out=
for f in s n r v m p i o; do
  case $fields in
    *a*) ;;
    *"$f"*) ;;
    *) continue ;;
  esac
  case $f in
    r) value=$release ;;
    m) value=$machine ;;
    *) value=$("$real" "-$f") || exit ;;
  esac
  if [ "$value" = unknown ]; then
    case $f$fields in
      [pi]*a*) continue ;;
    esac
  fi
  out="\${out:+$out }$value"
done
printf '%s\\n' "$out"
`;
}

/** The shim as a file for the layer, or an InputError saying why this tree cannot take it. */
export function unameShimFile(probe: RootProbe, architecture: Architecture, input: string): AddedFile {
  if (!probe.kernel) throw new InputError(input, '--uname-shim: no kernel version found under /lib/modules or /usr/src/kernels, so there is nothing for uname -r to report');
  if (probe.uname.exists) throw new InputError(input, `--uname-shim: the image already has ${UNAME_SHIM_PATH}; it is left alone rather than replaced`);
  if (!probe.uname.binDir) throw new InputError(input, `--uname-shim: /usr/local/bin is not a directory in the image (missing, or reached through a symlink), so the shim has no place`);
  const data = Buffer.from(unameShimScript(probe.kernel, MACHINE[architecture]));
  // /bin/uname's mtime in whole seconds: reproducible, and what Docker's tars keep anyway.
  const ns = 1_000_000_000n;
  const mtimeNs = probe.uname.mtimeNs < 0n ? 0n : (probe.uname.mtimeNs / ns) * ns;
  return {
    entry: { path: Buffer.from(UNAME_SHIM_PATH.slice(1)), type: 'file', mode: 0o755, uid: 0, gid: 0, size: data.length, mtimeNs },
    data,
  };
}
