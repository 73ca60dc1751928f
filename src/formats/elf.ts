/**
 * The ELF identification and machine of a binary (System V ABI, "ELF Header"): enough to tell a
 * 32-bit x86 root file system (XenServer 6.x Dom0) from an x86_64 one (7.x and later).
 */

export const ELFMAG = Buffer.from([0x7f, 0x45, 0x4c, 0x46]);
export const ELFCLASS32 = 1;
export const ELFCLASS64 = 2;
export const ELFDATA2LSB = 1;
export const ELFDATA2MSB = 2;
export const EM_386 = 3;
export const EM_X86_64 = 62;

/** Bytes needed: e_ident (16), e_type (2), e_machine (2). */
export const ELF_HEADER_PREFIX = 20;

export interface ElfIdent {
  /** e_ident[EI_CLASS]: ELFCLASS32 or ELFCLASS64. */
  EI_CLASS: number;
  /** e_ident[EI_DATA]: ELFDATA2LSB or ELFDATA2MSB. */
  EI_DATA: number;
  e_machine: number;
}

/** The header's class, byte order and machine; undefined when `head` is not the start of an ELF file. */
export function parseElfIdent(head: Buffer): ElfIdent | undefined {
  if (head.length < ELF_HEADER_PREFIX || !head.subarray(0, 4).equals(ELFMAG)) return undefined;
  const EI_CLASS = head[4]!;
  const EI_DATA = head[5]!;
  if ((EI_CLASS !== ELFCLASS32 && EI_CLASS !== ELFCLASS64) || (EI_DATA !== ELFDATA2LSB && EI_DATA !== ELFDATA2MSB)) return undefined;
  const e_machine = EI_DATA === ELFDATA2LSB ? head.readUInt16LE(18) : head.readUInt16BE(18);
  return { EI_CLASS, EI_DATA, e_machine };
}

/**
 * The Docker/OCI architecture of an ELF header: 386 for 32-bit little-endian EM_386, amd64 for
 * 64-bit little-endian EM_X86_64; undefined for anything else (x32 is EM_X86_64 with ELFCLASS32).
 */
export function elfArchitecture(ident: ElfIdent): '386' | 'amd64' | undefined {
  if (ident.EI_DATA !== ELFDATA2LSB) return undefined;
  if (ident.EI_CLASS === ELFCLASS32 && ident.e_machine === EM_386) return '386';
  if (ident.EI_CLASS === ELFCLASS64 && ident.e_machine === EM_X86_64) return 'amd64';
  return undefined;
}
