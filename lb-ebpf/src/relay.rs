//! The kernel TCP relay (`[[tcp.listener]]` with `relay = "kernel"`), in an object of its own so
//! that loading it creates only its own small maps, none of the XDP program's. A stream verdict
//! program on a sockhash: every byte a relayed socket receives is redirected to its peer's
//! send queue without waking userspace, and counted; a peer that falls BACKLOG bytes behind
//! pauses the socket (its bytes then wait in its own receive buffer for userspace; BACKLOG is
//! `lb_common::relay::BACKLOG`).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, sk_action},
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{map, stream_verdict},
    maps::{HashMap, SockHash},
    programs::SkBuffContext,
};
use lb_common::relay::{MAX_SOCKETS, RelayCounts, RelayPeer};

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

#[map(name = "LB_RELAY_COUNTS")]
static COUNTS: HashMap<u64, RelayCounts> =
    HashMap::with_max_entries(MAX_SOCKETS, BPF_F_NO_PREALLOC);

#[stream_verdict]
pub fn lb_relay(ctx: SkBuffContext) -> u32 {
    // SAFETY: the helper reads the cookie of the skb's socket; the context pointer is the one
    // the kernel gave this program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // A socket without entries (userspace is removing it) has nowhere to go: drop, as the
    // kernel does for a failed redirect. Userspace removes entries only after both sides ended.
    // SAFETY: lookups in maps of plain integers; the value stays valid for the program run.
    let Some(ctl) = (unsafe { PEERS.get(cookie) }) else { return sk_action::SK_DROP };
    let Some(counts) = COUNTS.get_ptr_mut(cookie) else { return sk_action::SK_DROP };
    let len = ctx.len() as u64;
    if len == 0 {
        // A bare FIN: its sequence number is accounted for already, and redirecting an empty
        // skb fails in the peer's send path (which then breaks the peer's pipe with EPIPE).
        // Userspace passes the FIN on, after the bytes before it.
        return sk_action::SK_DROP;
    }
    // SAFETY: `counts` points into the map value; the program runs for one socket at a time
    // (under its lock), and userspace only reads these.
    let c = unsafe { &mut *counts };
    if c.paused != 0 {
        if c.passed != ctl.resume_at || c.bytes + len > ctl.budget {
            // Bytes passed earlier still wait for userspace, or the peer is still behind:
            // these go after them. Passed bytes count against the socket's receive buffer,
            // so the client's TCP window closes: the backpressure a redirect lacks.
            c.passed += len;
            return sk_action::SK_PASS;
        }
        c.paused = 0;
    } else if c.bytes + len > ctl.budget {
        c.paused = 1;
        c.passed += len;
        return sk_action::SK_PASS;
    }
    let mut peer = ctl.peer;
    let verdict = TARGETS.redirect_skb(&ctx, &mut peer, 0) as u32;
    if verdict == sk_action::SK_PASS {
        c.bytes += len;
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        c.last_ns = unsafe { bpf_ktime_get_ns() };
    }
    verdict
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
