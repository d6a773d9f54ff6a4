//! The kernel/user contract of lb: every type and constant the XDP program and the daemon share.
//!
//! Everything here is `#[repr(C)]` with fixed-width fields and explicit padding, so the XDP program
//! (bpfel) and the daemon (x86_64/aarch64, little endian) agree on the bytes. Fields that carry
//! packet data (addresses, ports) are in network byte order and say so.
#![no_std]

pub mod checksum;
pub mod decap;
pub mod hash;
pub mod relay;

use core::mem::size_of;

/// Most services (VIP, port, protocol) the program can hold.
pub const MAX_SERVICES: u32 = 512;

/// Most backends across all services; backend id 0 means "unset", so ids run 1..MAX_BACKENDS.
pub const MAX_BACKENDS: u32 = 4096;

/// Slots in each service's Maglev table (prime).
pub const RING_SIZE: u32 = 65537;

/// Names of the maps in the object, checked to exist right after load.
pub mod maps {
    /// `HashMap<VipKey, VipInfo>`: which (address, port, protocol) are virtual services.
    pub const VIPS: &str = "LB_VIPS";
    /// `Array<u32>` of `MAX_SERVICES * RING_SIZE`: backend id per Maglev slot, service-major.
    pub const RING: &str = "LB_RING";
    /// `Array<u32>` of 65536, indexed by destination port (host order): non-zero when some VIP
    /// listens on that port. A frame to any other port skips the flow and VIP lookups.
    pub const VIP_PORTS: &str = "LB_VIP_PORTS";
    /// `Array<u32>` of 65536, indexed by [`crate::vip_addr_slot`] of the destination address:
    /// non-zero when some VIP's address folds to that slot. With `VIP_PORTS`, a frame to a
    /// backend's or the host's own address on a VIP port skips the lookups too.
    pub const VIP_ADDRS: &str = "LB_VIP_ADDRS";
    /// `Array<BackendInfo>` indexed by backend id (0 is never used).
    pub const BACKENDS: &str = "LB_BACKENDS";
    /// `LruHashMap<FlowKey, FlowState>`: client-side connection tracking of confirmed flows
    /// (TCP after the client's ACK of the SYN-ACK; UDP from the start).
    pub const FLOWS: &str = "LB_FLOWS";
    /// `LruHashMap<NatKey, NatState>`: backend-side reverse NAT of confirmed flows.
    pub const NAT: &str = "LB_NAT";
    /// `LruHashMap<FlowKey, FlowState>`: TCP flows not confirmed yet. Apart from `FLOWS`, so a
    /// SYN flood evicts only other unconfirmed flows, never an established one.
    pub const FLOWS_NEW: &str = "LB_FLOWS_NEW";
    /// `LruHashMap<NatKey, NatState>`: reverse NAT of the flows in `FLOWS_NEW`. A SNAT port is
    /// in at most one of `NAT` and `NAT_NEW`.
    pub const NAT_NEW: &str = "LB_NAT_NEW";
    /// `HashMap<u32, IfaceAddrs>`: the balancer's own address per ifindex (the SNAT source).
    pub const IFACES: &str = "LB_IFACES";
    /// `HashMap<u32, SnatPool>`: the SNAT addresses of an interface (`[[xdp.snat]]`), keyed by
    /// ifindex. An interface without an entry (or without addresses of a packet's family)
    /// uses its own address from `IFACES`. Read only when a new flow takes its SNAT address.
    pub const SNAT_POOLS: &str = "LB_SNAT_POOLS";
    /// `DevMapHash`: the interfaces frames may be redirected to, keyed by ifindex.
    pub const DEVMAP: &str = "LB_DEVMAP";
    /// `Array<Settings>` with one entry.
    pub const SETTINGS: &str = "LB_SETTINGS";
    /// `PerCpuArray<u32>`: each CPU's NAT port cursor.
    pub const PORT_CURSOR: &str = "LB_PORT_CURSOR";
    /// `PerCpuArray<Counter>` indexed by service id.
    pub const SERVICE_STATS: &str = "LB_SERVICE_STATS";
    /// `PerCpuArray<Counter>` indexed by backend id.
    pub const BACKEND_STATS: &str = "LB_BACKEND_STATS";
    /// `PerCpuArray<u64>` indexed by [`crate::stat`].
    pub const STATS: &str = "LB_STATS";

    /// Every map, for the check after load and for pinning.
    pub const ALL: [&str; 17] = [
        VIPS,
        RING,
        VIP_PORTS,
        VIP_ADDRS,
        BACKENDS,
        FLOWS,
        NAT,
        FLOWS_NEW,
        NAT_NEW,
        IFACES,
        SNAT_POOLS,
        DEVMAP,
        SETTINGS,
        PORT_CURSOR,
        SERVICE_STATS,
        BACKEND_STATS,
        STATS,
    ];
}

/// Names of the programs in the object.
pub mod programs {
    /// The balancer, attached to every served interface.
    pub const BALANCER: &str = "lb_xdp";
    /// A do-nothing XDP_PASS program, in the separate `lb-pass` object: veth peers that
    /// receive XDP_TX or XDP_REDIRECT traffic need an XDP program of their own, or the kernel
    /// drops those frames.
    pub const PASS: &str = "lb_pass";
}

/// Address families as stored in [`VipKey::family`].
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// IP protocol numbers as stored in [`VipKey::proto`].
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Identifies a virtual service.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VipKey {
    /// Network byte order. IPv4 uses the first 4 bytes; the rest are zero.
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    pub _pad: [u8; 4],
}
const _: () = assert!(size_of::<VipKey>() == 24);

/// The slot of `maps::VIP_ADDRS` for an address (network byte order, IPv4 in the first 4
/// bytes): its last two bytes, where addresses of one subnet differ most.
#[inline(always)]
pub fn vip_addr_slot(addr: &[u8; 16], family: u8) -> u32 {
    let (hi, lo) = if family == FAMILY_V4 { (addr[2], addr[3]) } else { (addr[14], addr[15]) };
    (hi as u32) << 8 | lo as u32
}

/// `VipInfo::flags`: hash the whole five-tuple instead of the client address alone.
pub const VIP_F_FIVE_TUPLE: u32 = 1;
/// `VipInfo::flags`: direct server return. Packets are encapsulated toward the backend
/// (IPv4-in-IPv4, IPv6-in-IPv6), which answers the client itself; no SNAT, no reply path.
pub const VIP_F_DSR: u32 = 2;
/// With [`VIP_F_DSR`]: encapsulate in UDP (GUE variant 1, draft-ietf-intarea-gue: the IP
/// packet straight after the UDP header, told apart by its version nibble) instead of bare
/// IP-in-IP, for networks that drop IP protocols 4 and 41. The UDP source port varies per
/// flow, so the backend's NIC spreads flows over its queues.
pub const VIP_F_GUE: u32 = 4;

/// The UDP destination port of GUE-encapsulated packets (what `lb decap` listens for).
pub const GUE_PORT: u16 = 6080;
/// Bytes encapsulation adds: an outer IPv4 (20) or IPv6 (40) header, plus the UDP header (8)
/// with [`VIP_F_GUE`].
pub const ENCAP_V4: u16 = 20;
pub const ENCAP_V6: u16 = 40;
pub const ENCAP_GUE: u16 = 8;

/// What the program knows about a virtual service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipInfo {
    /// Index into the per-service maps; below [`MAX_SERVICES`].
    pub service_id: u32,
    /// `VIP_F_*` bits.
    pub flags: u32,
}
const _: () = assert!(size_of::<VipInfo>() == 8);

/// Packets, bytes (whole frames as seen by XDP) and new flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
    pub flows: u64,
}
const _: () = assert!(size_of::<Counter>() == 24);

impl Counter {
    /// Sums per-CPU values.
    pub fn add(&mut self, other: &Counter) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.flows += other.flows;
    }
}

/// `BackendInfo::flags`: the slot holds a live backend.
pub const BACKEND_F_ACTIVE: u32 = 1;

/// A backend as the program sees it.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendInfo {
    /// Network byte order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
    /// `BACKEND_F_*`.
    pub flags: u32,
    /// Bumped each time the id is given to another backend, so flows tracked to the previous
    /// owner of the id are not sent to the new one.
    pub generation: u32,
    /// The service this backend serves (ids are per service and backend address).
    pub service_id: u32,
}
const _: () = assert!(size_of::<BackendInfo>() == 32);

/// The client side of a tracked flow: exactly the packet's (src, dst=VIP, ports, proto).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// Network byte order.
    pub src: [u8; 16],
    /// Network byte order.
    pub dst: [u8; 16],
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: u16,
}
const _: () = assert!(size_of::<FlowKey>() == 40);

/// `FlowState::flags` and `NatState::flags` bits.
pub const FLOW_F_FIN_CLIENT: u32 = 1;
pub const FLOW_F_FIN_BACKEND: u32 = 2;
pub const FLOW_F_RST: u32 = 4;
/// The backend answered: a SYN-ACK (TCP), any datagram (UDP).
pub const FLOW_F_SYNACK: u32 = 8;
/// The client acknowledged the backend's SYN-ACK (TCP), or sent again after its answer (UDP):
/// the flow is confirmed. Until then a TCP flow may be a spoofed or abandoned SYN and ages
/// under `Settings::tcp_syn_ns`; both live in the unconfirmed tables.
pub const FLOW_F_CONFIRMED: u32 = 16;
/// A flow of a DSR service ([`VIP_F_DSR`], with [`VIP_F_GUE`] as `FLOW_F_GUE`): it has no NAT
/// entry, and its backend's answers never pass the balancer.
pub const FLOW_F_DSR: u32 = 32;
pub const FLOW_F_GUE: u32 = 64;

/// A cached next hop: where `bpf_fib_lookup` last said to send a flow's frames. Refreshed after
/// [`HOP_TTL_NS`], so established flows skip the FIB on most packets.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Hop {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// `bpf_ktime_get_coarse_ns` of the lookup; 0 = never looked up.
    pub at_ns: u64,
}
const _: () = assert!(size_of::<Hop>() == 24);

/// How long a cached next hop is trusted (a neighbour's new MAC is picked up within this).
pub const HOP_TTL_NS: u64 = 1_000_000_000;

/// Where a tracked flow goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowState {
    pub backend_id: u32,
    /// `BackendInfo::generation` when the flow was created.
    pub generation: u32,
    /// The balancer's address toward the backend (SNAT source), network byte order.
    pub snat: [u8; 16],
    /// The SNAT source port, network byte order.
    pub nat_port: u16,
    /// The IP MTU toward the backend from the last route lookup (0 = not known yet): larger
    /// packets get an ICMP "fragmentation needed" / "packet too big" instead.
    pub mtu: u16,
    /// `FLOW_F_*`, set by either direction.
    pub flags: u32,
    /// `bpf_ktime_get_coarse_ns` of the last client packet (and of FIN/RST and UDP replies);
    /// for an unconfirmed TCP flow, of its creation, so retransmitted SYNs do not extend it.
    pub last_seen_ns: u64,
    /// Next hop toward the backend.
    pub hop: Hop,
    /// TCP: the sequence number after the client's latest segment (host byte order), the
    /// reference for telling a client RST the backend would accept from a blind one.
    pub client_next: u32,
    /// A GUE flow's outer UDP source port (network byte order), picked once from its hash.
    pub encap_sport: u16,
    pub _pad2: u16,
}
const _: () = assert!(size_of::<FlowState>() == 72);

/// The backend side of a tracked flow: the reply's (src=backend, dst=SNAT address, ports).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NatKey {
    /// Backend address, network byte order.
    pub backend: [u8; 16],
    /// SNAT address, network byte order.
    pub snat: [u8; 16],
    /// Backend port, network byte order.
    pub backend_port: u16,
    /// SNAT port, network byte order.
    pub nat_port: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: u16,
}
const _: () = assert!(size_of::<NatKey>() == 40);

/// How to turn a reply back into VIP → client.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatState {
    /// The client-side key of the flow; replies update its flags and last-seen time.
    pub flow: FlowKey,
    pub backend_id: u32,
    pub service_id: u32,
    /// Next hop toward the client.
    pub hop: Hop,
    /// `bpf_ktime_get_coarse_ns` of creation, then of replies (rate-limited): with the flow's
    /// own time it tells an idle TCP flow from one where only the backend talks.
    pub last_seen_ns: u64,
    /// 0 while the entry's flow owns it; set to 1 (compare-and-swap) by the one CPU that
    /// reclaims the port, so two reclaimers of one dead entry cannot both win.
    pub claim: u64,
    /// The interface through which the backend is reached: replies arriving on any other
    /// one are not the backend's and are dropped.
    pub backend_ifindex: u32,
    /// The IP MTU toward the client from the last route lookup (0 = not known yet).
    pub mtu: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<NatState>() == 96);

/// The balancer's own addresses on one interface, network byte order; all-zero when absent.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IfaceAddrs {
    pub v6: [u8; 16],
    pub v4: [u8; 4],
    pub _pad: [u8; 4],
}
const _: () = assert!(size_of::<IfaceAddrs>() == 24);

/// Most SNAT addresses of one family on one interface (`[[xdp.snat]] addresses`); also the
/// bound of the program's loop over them when one address has no free port.
pub const MAX_SNAT_ADDRS: u32 = 16;

/// The SNAT addresses of one interface, network byte order. New flows toward a backend
/// spread over them; each address has the whole `nat_ports` range, so a backend's limit of
/// concurrent flows through this interface is addresses × ports.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SnatPool {
    /// IPv6 addresses in slots `0..v6_count`; the rest are zero.
    pub v6: [[u8; 16]; MAX_SNAT_ADDRS as usize],
    /// IPv4 addresses in slots `0..v4_count`; the rest are zero.
    pub v4: [[u8; 4]; MAX_SNAT_ADDRS as usize],
    /// How many slots of `v4` and `v6` are used (at most [`MAX_SNAT_ADDRS`] each).
    pub v4_count: u32,
    pub v6_count: u32,
}
const _: () = assert!(size_of::<SnatPool>() == 328);

/// Default capacity of the flow and NAT tables (each); `xdp.max_flows` overrides it.
pub const DEFAULT_MAX_FLOWS: u32 = 262_144;

/// Default capacity of the unconfirmed flow and NAT tables (each); `xdp.max_unconfirmed_flows`
/// overrides it (the daemon's default is a quarter of `max_flows`).
pub const DEFAULT_MAX_UNCONFIRMED_FLOWS: u32 = DEFAULT_MAX_FLOWS / 4;

/// Runtime settings written by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Settings {
    /// A UDP flow idle this long is new again (nanoseconds).
    pub udp_idle_ns: u64,
    /// A TCP flow closed (RST, or FIN both ways) this long ago is gone (nanoseconds).
    pub tcp_closed_ns: u64,
    /// A TCP flow not confirmed (no client ACK after the backend's SYN-ACK) this long after
    /// its SYN is gone (nanoseconds).
    pub tcp_syn_ns: u64,
    /// A confirmed TCP flow with no packet either way for this long is gone (nanoseconds).
    pub tcp_idle_ns: u64,
    /// SNAT ports are taken from `[nat_port_min, nat_port_max]`, host byte order.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    /// CPUs the program may run on (informational: ports are not sliced per CPU; each CPU's
    /// allocator starts at its own random cursor and claims a port with an atomic insert).
    pub cpus: u32,
}
const _: () = assert!(size_of::<Settings>() == 40);

/// Defaults for [`Settings`].
pub const DEFAULT_UDP_IDLE_NS: u64 = 30_000_000_000;
pub const DEFAULT_TCP_CLOSED_NS: u64 = 2_000_000_000;
pub const DEFAULT_TCP_SYN_NS: u64 = 10_000_000_000;
/// Six hours, as Cilium's `bpf-ct-timeout-regular-tcp`.
pub const DEFAULT_TCP_IDLE_NS: u64 = 21_600_000_000_000;
pub const DEFAULT_NAT_PORT_MIN: u16 = 1024;
pub const DEFAULT_NAT_PORT_MAX: u16 = 32767;

/// Indexes into the global `LB_STATS` per-CPU array: why a packet got its action.
pub mod stat {
    macro_rules! reasons {
        ($($name:ident = $value:expr, $text:literal;)*) => {
            $(#[doc = $text] pub const $name: u32 = $value;)*
            /// Number of reasons; the size of `LB_STATS`.
            pub const COUNT: u32 = [$($value),*].len() as u32;
            /// Names in index order, used by `lb stats` and `/metrics`.
            pub const NAMES: [&str; COUNT as usize] = [$($text),*];
        };
    }
    reasons! {
        RX = 0, "rx";
        PASS_NOT_IP = 1, "pass_not_ip";
        PASS_NOT_L4 = 2, "pass_not_l4";
        PASS_NOT_VIP = 3, "pass_not_vip";
        PASS_TRUNCATED = 4, "pass_truncated";
        VIP_HIT = 5, "vip_hit";
        FLOW_HIT = 6, "flow_hit";
        FLOW_MISS = 7, "flow_miss";
        FLOW_NEW = 8, "flow_new";
        REPLY = 9, "reply";
        TX = 10, "tx";
        REDIRECT = 11, "redirect";
        PASS_NO_NEIGH = 12, "pass_no_neigh";
        PASS_ICMP = 13, "pass_icmp";
        PASS_FRAGMENT = 14, "pass_fragment";
        PASS_BAD_HEADER = 15, "pass_bad_header";
        DROP_NOT_SYN = 16, "drop_not_syn";
        DROP_NO_BACKEND = 17, "drop_no_backend";
        DROP_BACKEND_GONE = 18, "drop_backend_gone";
        DROP_NO_ROUTE = 19, "drop_no_route";
        DROP_NO_SNAT_ADDR = 20, "drop_no_snat_addr";
        DROP_NO_PORT = 21, "drop_no_port";
        DROP_MAP_FULL = 22, "drop_map_full";
        DROP_REDIRECT = 23, "drop_redirect";
        DROP_NO_NEIGH = 24, "drop_no_neigh";
        PASS_TTL = 25, "pass_ttl_exceeded";
        PORT_RECLAIMED = 26, "port_reclaimed";
        EXPIRED_SYN = 27, "flow_expired_syn";
        EXPIRED_IDLE = 28, "flow_expired_idle";
        FLOW_CONFIRMED = 29, "flow_confirmed";
        DROP_UNCONFIRMED_LOST = 30, "drop_unconfirmed_lost";
        RST_OUT_OF_WINDOW = 31, "rst_out_of_window";
        DROP_WRONG_IFACE = 32, "drop_wrong_iface";
        ICMP_TOO_BIG = 33, "icmp_too_big_sent";
        ICMP_TO_CLIENT = 34, "icmp_error_to_client";
        ICMP_TO_BACKEND = 35, "icmp_error_to_backend";
        DROP_NAT_LOST = 36, "drop_nat_lost";
        NAT_RESTORED = 37, "nat_restored";
        SNAT_ADDR_NEXT = 38, "snat_addr_next";
        DSR_ENCAP = 39, "dsr_encapsulated";
        DSR_UNTRACKED = 40, "dsr_untracked";
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is repr(C), has no padding that is not an explicit field, and any byte
    // pattern is a valid value.
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipInfo {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::BackendInfo {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowState {}
    unsafe impl aya::Pod for super::NatKey {}
    unsafe impl aya::Pod for super::NatState {}
    unsafe impl aya::Pod for super::IfaceAddrs {}
    unsafe impl aya::Pod for super::SnatPool {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::Hop {}
    unsafe impl aya::Pod for super::decap::DecapKey {}
    unsafe impl aya::Pod for super::decap::DecapSettings {}
}
