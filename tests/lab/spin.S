# A guest all of whose vCPUs spin, as a loaded guest's never idle: the boot
# CPU enters 32-bit protected mode (for the local APIC's address), puts
# `jmp $` at 0x8000, sends INIT and then STARTUP (vector 0x08: 0x8000) to
# every other CPU, and spins; the others start at 0x8000 and spin there.
        .include "boot32.inc"
main32:
        movw    $0xfeeb, 0x8000         # jmp $, for the other CPUs
        movl    $0x000c4500, 0xfee00300 # INIT, all but self
        mov     $0x100000, %ecx
1:      loop    1b
        movl    $0x000c4608, 0xfee00300 # STARTUP at 0x8000, all but self
        mov     $0x100000, %ecx
2:      loop    2b
        movl    $0x000c4608, 0xfee00300 # again, as the protocol has it
spin:
        jmp     spin

        .org    510
        .word   0xaa55
