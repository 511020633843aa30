//! Whether the process runs under valgrind, for the few places where the library trades
//! memcheck's view for speed (the message block cache).

/// valgrind's RUNNING_ON_VALGRIND client request: its "special instruction" sequence,
/// which valgrind recognises and answers, and which natively leaves every register as
/// it was (the four rotations of rdi add up to 128 bits) so the default 0 stands.
#[cfg(target_arch = "x86_64")]
pub(crate) fn running_on_valgrind() -> bool {
    /// VG_USERREQ__RUNNING_ON_VALGRIND in valgrind.h.
    const RUNNING_ON_VALGRIND: u64 = 0x1001;
    let args: [u64; 6] = [RUNNING_ON_VALGRIND, 0, 0, 0, 0, 0];
    let mut answer: u64 = 0;
    // SAFETY: natively the sequence is four rotations of rdi by 3, 13, 61 and 51 bits
    // (rdi comes back unchanged; declared clobbered anyway; the flags change) and an exchange of rbx with
    // itself; valgrind reads the six words at rax and writes its answer to rdx. No
    // memory is written, the stack is untouched.
    unsafe {
        std::arch::asm!(
            "rol rdi, 3",
            "rol rdi, 13",
            "rol rdi, 61",
            "rol rdi, 51",
            "xchg rbx, rbx",
            in("rax") args.as_ptr(),
            inout("rdx") answer,
            inout("rdi") 0u64 => _,
            options(nostack, readonly),
        );
    }
    answer != 0
}

/// Other architectures: assumed not (the block cache stays on; run valgrind there
/// knowing cached blocks show as "still reachable").
#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn running_on_valgrind() -> bool {
    false
}
