/** The 52-byte header of a 32-bit x86 executable: e_ident ELFCLASS32/ELFDATA2LSB, e_type ET_EXEC, e_machine EM_386. */
export function elf386(): Buffer {
  const h = Buffer.alloc(52);
  Buffer.from([0x7f, 0x45, 0x4c, 0x46, 1, 1, 1]).copy(h);
  h.writeUInt16LE(2, 16);
  h.writeUInt16LE(3, 18);
  h.writeUInt32LE(1, 20);
  h.writeUInt16LE(52, 40);
  return h;
}
