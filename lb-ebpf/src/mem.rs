//! Word-wise copies. BPF has no memcpy: LLVM calls one that bpf-linker provides as a byte loop,
//! which made struct copies the most expensive part of the hot path. These copy 8 bytes at a
//! time; volatile accesses keep LLVM from turning them back into a memcpy call.

/// Copies a whole `T` (size a multiple of 8; both references 8-byte aligned).
#[inline(always)]
pub fn copy<T>(dst: &mut T, src: &T) {
    let n = core::mem::size_of::<T>() / 8;
    let d = dst as *mut T as *mut u64;
    let s = src as *const T as *const u64;
    let mut i = 0;
    while i < n {
        // SAFETY: `i < n` keeps both accesses inside the objects; every `T` passed here is
        // align(8) (the lb_common map types, Work's fields).
        unsafe { d.add(i).write_volatile(s.add(i).read_volatile()) };
        i += 1;
    }
}

/// Copies an address between two 8-byte aligned `[u8; 16]` fields.
#[inline(always)]
pub fn copy16(dst: &mut [u8; 16], src: &[u8; 16]) {
    let d = dst.as_mut_ptr() as *mut u64;
    let s = src.as_ptr() as *const u64;
    // SAFETY: callers pass address fields at 8-byte aligned offsets of align(8) structs.
    unsafe {
        d.write_volatile(s.read_volatile());
        d.add(1).write_volatile(s.add(1).read_volatile());
    }
}

/// Compares two whole `T`s word by word (same layout rules as [`copy`]); a derived `==` on
/// byte arrays would call memcmp, another byte loop.
#[inline(always)]
pub fn eq<T>(a: &T, b: &T) -> bool {
    let n = core::mem::size_of::<T>() / 8;
    let x = a as *const T as *const u64;
    let y = b as *const T as *const u64;
    let mut i = 0;
    let mut diff = 0u64;
    while i < n {
        // SAFETY: as in `copy`.
        diff |= unsafe { x.add(i).read_volatile() ^ y.add(i).read_volatile() };
        i += 1;
    }
    diff == 0
}

/// Atomically sets `word` from 0 to 1; true for the one caller that did. The BPF target has no
/// `AtomicU64::compare_exchange` (atomic-cas is off in its spec), but the kernel runs
/// BPF_CMPXCHG, which LLVM emits for this intrinsic.
#[cfg(target_arch = "bpf")]
#[inline(always)]
pub fn claim(word: &mut u64) -> bool {
    use core::intrinsics::{AtomicOrdering, atomic_cxchg};
    // SAFETY: an aligned u64 that other CPUs only ever change through this function.
    let (_, won) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(word, 0, 1)
    };
    won
}

/// The same on the host (the crate is type-checked there; the program never runs there).
#[cfg(not(target_arch = "bpf"))]
#[inline(always)]
pub fn claim(word: &mut u64) -> bool {
    use core::sync::atomic::{AtomicU64, Ordering};
    let cell = word as *mut u64;
    // SAFETY: an aligned u64 that other CPUs only ever change through this function.
    unsafe { AtomicU64::from_ptr(cell) }
        .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
}
