//! The ABI of the kernel TCP relay (the `lb-relay` object): a sockhash of relayed sockets and,
//! per socket, its peer and what the verdict program has moved for it. Keyed by socket cookie
//! (`SO_COOKIE`, a u64 in host byte order that the kernel never reuses while it runs).
use core::mem::size_of;

/// Sockets and connection entries the relay holds at once (two per relayed connection).
pub const MAX_SOCKETS: u32 = 131_072;

/// Map names in the `lb-relay` object.
pub mod maps {
    /// `SockHash<u64>`: every relayed socket whose received bytes the verdict program takes,
    /// keyed by its own cookie; the program is attached to this map.
    pub const SOCKS: &str = "LB_RELAY_SOCKS";
    /// `SockHash<u64>`: the same sockets as redirect targets, with no program. A socket joins
    /// here before either socket joins [`SOCKS`], so that the first bytes the program takes
    /// always find their peer (a redirect to a socket not yet in the map would drop them).
    pub const TARGETS: &str = "LB_RELAY_TARGETS";
    /// `HashMap<u64, RelayPeer>`: per socket cookie, where its bytes go and its budget.
    pub const PEERS: &str = "LB_RELAY_PEERS";
    /// `HashMap<u64, RelayCounts>`: per socket cookie, what the program moved.
    pub const COUNTS: &str = "LB_RELAY_COUNTS";
    /// Every map of the object, checked after load.
    pub const ALL: [&str; 4] = [SOCKS, TARGETS, PEERS, COUNTS];
}

/// The stream verdict program, attached to [`maps::SOCKS`].
pub const PROGRAM: &str = "lb_relay";

/// Bytes the program may redirect from one socket before its peer has sent them on: the bound
/// on what the kernel holds for a relayed direction beyond the sockets' own buffers.
pub const BACKLOG: u64 = 16 << 20;

/// What userspace tells the program about one relayed socket (only userspace writes it: an
/// update from userspace replaces the whole value, so the program's counters live apart, in
/// [`RelayCounts`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RelayPeer {
    /// Cookie of the peer socket (host byte order).
    pub peer: u64,
    /// Redirect while [`RelayCounts::bytes`] stays at most this; beyond, pause (the peer has
    /// not sent on what it got). Userspace keeps it at what the peer sent on + [`BACKLOG`].
    pub budget: u64,
    /// Bytes userspace has read of those passed to this socket while paused; when it equals
    /// [`RelayCounts::passed`] nothing passed waits any more and the program may resume.
    pub resume_at: u64,
    pub _pad: u64,
}
const _: () = assert!(size_of::<RelayPeer>() == 32);

/// What the program counts for one relayed socket (only the program writes it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RelayCounts {
    /// Bytes received on this socket and redirected to the peer's send queue.
    pub bytes: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC, ns) of the last byte taken; 0 before any.
    pub last_ns: u64,
    /// Bytes received while paused, left on this socket for userspace to read and send on.
    pub passed: u64,
    /// 1 while paused: the budget ran out, every byte is passed (in order) until userspace has
    /// read all of them and given a new budget.
    pub paused: u64,
}
const _: () = assert!(size_of::<RelayCounts>() == 32);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), four u64 fields each and no padding; any byte pattern is valid.
    unsafe impl aya::Pod for super::RelayPeer {}
    unsafe impl aya::Pod for super::RelayCounts {}
}
