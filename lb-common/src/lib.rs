//! The kernel/user contract of lb: every type and constant the XDP program and the daemon share.
//!
//! Everything here is `#[repr(C)]` with fixed-width fields and explicit padding, so the XDP program
//! (bpfel) and the daemon (x86_64/aarch64, little endian) agree on the bytes. Fields that carry
//! packet data (addresses, ports) are in network byte order and say so.
#![no_std]

pub mod checksum;
pub mod hash;

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
    /// `PerCpuArray<Counter>` indexed by service id.
    pub const SERVICE_STATS: &str = "LB_SERVICE_STATS";
    /// `PerCpuArray<u64>` indexed by [`crate::stat`].
    pub const STATS: &str = "LB_STATS";
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
#[repr(C)]
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
}
const _: () = assert!(size_of::<VipKey>() == 20);

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

/// A packet and byte counter (bytes are whole frames as seen by XDP).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<Counter>() == 16);

impl Counter {
    /// Sums per-CPU values.
    pub fn add(&mut self, other: &Counter) {
        self.packets += other.packets;
        self.bytes += other.bytes;
    }
}

/// Indexes into the global `LB_STATS` per-CPU array: why a packet got its action.
pub mod stat {
    /// Every packet the program saw.
    pub const RX: u32 = 0;
    /// Passed: not IPv4/IPv6 (ARP, LLDP, ...).
    pub const PASS_NOT_IP: u32 = 1;
    /// Passed: IP but neither TCP nor UDP, or IPv6 with extension headers.
    pub const PASS_NOT_L4: u32 = 2;
    /// Passed: destination is not a virtual service.
    pub const PASS_NOT_VIP: u32 = 3;
    /// Passed: header shorter than it claims (the kernel drops or handles it).
    pub const PASS_TRUNCATED: u32 = 4;
    /// Matched a virtual service.
    pub const VIP_HIT: u32 = 5;
    /// Number of reasons; the size of `LB_STATS`.
    pub const COUNT: u32 = 6;

    /// Human names, in index order, used by `lb stats` and `/metrics`.
    pub const NAMES: [&str; COUNT as usize] =
        ["rx", "pass_not_ip", "pass_not_l4", "pass_not_vip", "pass_truncated", "vip_hit"];
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is repr(C), has no padding that is not an explicit field, and any byte
    // pattern is a valid value.
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipInfo {}
    unsafe impl aya::Pod for super::Counter {}
}
