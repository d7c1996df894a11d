# A guest that touches its memory forever: a boot sector that enters
# 32-bit protected mode and writes one word to every 4 KiB page from
# 16 MiB to 976 MiB, over and over, sending a '.' to the serial port
# after each MiB. Read with timestamps, the dots show how long the guest
# was stopped: the longest gap between two is its longest stall.
        .include "boot32.inc"
main32:
        mov     $0x3f8, %dx
pass:
        mov     $0x01000000, %edi       # 16 MiB
page:
        mov     %edi, (%edi)
        add     $4096, %edi
        test    $0xfffff, %edi          # a MiB done?
        jnz     next
        mov     $'.', %al
        outb    %al, %dx
next:
        cmp     $0x3d000000, %edi       # 976 MiB
        jb      page
        jmp     pass

        .org    510
        .word   0xaa55
