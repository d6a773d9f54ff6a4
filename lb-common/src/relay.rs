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
    /// `HashMap<u64, RelayPeer>`: per socket cookie, where its bytes go and what moved.
    pub const PEERS: &str = "LB_RELAY_PEERS";
    /// Every map of the object, checked after load.
    pub const ALL: [&str; 3] = [SOCKS, TARGETS, PEERS];
}

/// The stream verdict program, attached to [`maps::SOCKS`].
pub const PROGRAM: &str = "lb_relay";

/// One relayed socket: the cookie of the socket its received bytes are redirected to, and
/// counters the program keeps (userspace reads them on a timer and at close).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RelayPeer {
    /// Cookie of the peer socket (host byte order).
    pub peer: u64,
    /// Bytes received on this socket and redirected to the peer's send queue.
    pub bytes: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC, ns) of the last redirect; 0 before any.
    pub last_ns: u64,
    /// Bytes dropped because the redirect failed (the peer left the sockhash).
    pub dropped: u64,
}
const _: () = assert!(size_of::<RelayPeer>() == 32);

#[cfg(feature = "user")]
// SAFETY: repr(C), four u64 fields and no padding; any byte pattern is a valid value.
unsafe impl aya::Pod for RelayPeer {}
