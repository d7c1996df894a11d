# A guest that touches its memory forever: a boot sector that enters
# 32-bit protected mode and writes one word to every 4 KiB page from
# 16 MiB to 976 MiB, over and over, sending a '.' to the serial port
# after each MiB. Read with timestamps, the dots show how long the guest
# was stopped: the longest gap between two is its longest stall.
        .code16
        .globl _start
_start:
        cli
        xor     %ax, %ax
        mov     %ax, %ds
        mov     %ax, %ss
        mov     $0x7c00, %sp
        inb     $0x92, %al              # fast A20
        orb     $2, %al
        outb    %al, $0x92
        lgdtl   gdt_descriptor
        mov     %cr0, %eax
        or      $1, %eax
        mov     %eax, %cr0
        ljmpl   $0x08, $protected
        .code32
protected:
        mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $0x7c00, %esp
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

        .p2align 3
gdt:
        .quad   0
        .quad   0x00cf9a000000ffff      # code: flat 4 GiB, 32-bit
        .quad   0x00cf92000000ffff      # data: flat 4 GiB
gdt_descriptor:
        .word   gdt_descriptor - gdt - 1
        .long   gdt

        .org    510
        .word   0xaa55
