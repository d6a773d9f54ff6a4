//! The kernel TCP relay (`[[tcp.listener]]` with `relay = "kernel"`), in an object of its own so
//! that loading it creates only its two small maps, none of the XDP program's. A stream verdict
//! program on a sockhash: every byte a relayed socket receives is redirected to its peer's
//! send queue without waking userspace, and counted for the peer's socket entry.
#![no_std]
#![no_main]
// For `atomic_xadd`: the BPF target spec offers no atomic read-modify-write types.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, sk_action},
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{map, stream_verdict},
    maps::{HashMap, SockHash},
    programs::SkBuffContext,
};
use lb_common::relay::{MAX_SOCKETS, RelayPeer};

// The map the program is attached to: sockets whose received bytes it takes.
#[map(name = "LB_RELAY_SOCKS")]
static SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

// The same sockets as redirect targets (no program): each joins here first, so a redirect never
// looks for a peer that is not in yet.
#[map(name = "LB_RELAY_TARGETS")]
static TARGETS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

// Not preallocated: an idle daemon holds no entry memory.
#[map(name = "LB_RELAY_PEERS")]
static PEERS: HashMap<u64, RelayPeer> = HashMap::with_max_entries(MAX_SOCKETS, BPF_F_NO_PREALLOC);

#[stream_verdict]
pub fn lb_relay(ctx: SkBuffContext) -> u32 {
    // SAFETY: the helper reads the cookie of the skb's socket; the context pointer is the one
    // the kernel gave this program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // A socket without an entry (userspace is removing it) has nowhere to go: drop, as the
    // kernel does for a failed redirect. Userspace removes entries only after both sides ended.
    let Some(entry) = PEERS.get_ptr_mut(&cookie) else { return sk_action::SK_DROP };
    let len = ctx.len() as u64;
    if len == 0 {
        // A bare FIN: its sequence number is accounted for already, and redirecting an empty
        // skb fails in the peer's send path (which then breaks the peer's pipe with EPIPE).
        // Userspace passes the FIN on, after the bytes before it.
        return sk_action::SK_DROP;
    }
    // SAFETY: `entry` points into the map value, valid for the whole program run.
    let mut peer = unsafe { (*entry).peer };
    let verdict = TARGETS.redirect_skb(&ctx, &mut peer, 0) as u32;
    // SAFETY: as above. The counters only change atomically (userspace may read them while a
    // socket's bytes are counted); a racing store of `last_ns` writes a time just as recent.
    unsafe {
        if verdict == sk_action::SK_PASS {
            add(&raw mut (*entry).bytes, len);
            (&raw mut (*entry).last_ns).write_volatile(bpf_ktime_get_ns());
        } else {
            add(&raw mut (*entry).dropped, len);
        }
    }
    verdict
}

/// `*word += n`, atomically (BPF_ATOMIC_ADD).
///
/// # Safety
/// `word` is valid and aligned.
#[cfg(target_arch = "bpf")]
#[inline(always)]
unsafe fn add(word: *mut u64, n: u64) {
    use core::intrinsics::{AtomicOrdering, atomic_xadd};
    // SAFETY: the caller's.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(word, n) };
}

/// The same on the host (the crate is type-checked there; the program never runs there).
#[cfg(not(target_arch = "bpf"))]
#[inline(always)]
unsafe fn add(word: *mut u64, n: u64) {
    use core::sync::atomic::{AtomicU64, Ordering};
    // SAFETY: the caller's.
    unsafe { AtomicU64::from_ptr(word) }.fetch_add(n, Ordering::Relaxed);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
