//! The contract of `lb decap`'s XDP program (`lb-decap` object) with `lb decap attach`: it
//! strips the outer header of packets a DSR balancer wrapped (IPv4-in-IPv4, IPv6-in-IPv6, or
//! IP in UDP to [`crate::GUE_PORT`]) and hands the inner packet to the local stack.

/// Map names.
pub const VIPS: &str = "LB_DECAP_VIPS";
pub const SETTINGS: &str = "LB_DECAP_SETTINGS";
pub const STATS: &str = "LB_DECAP_STATS";
/// The program's name in the object.
pub const PROGRAM: &str = "lb_decap";

/// Most VIPs one backend accepts.
pub const MAX_VIPS: u32 = 1024;

/// A VIP whose packets may be unwrapped (network byte order; IPv4 in the first 4 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DecapKey {
    pub addr: [u8; 16],
    /// [`crate::FAMILY_V4`] or [`crate::FAMILY_V6`].
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<DecapKey>() == 20);

/// `SETTINGS[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DecapSettings {
    /// 1: unwrap only packets to a VIP of [`VIPS`] (others are dropped: an encapsulated packet
    /// is a way to put any source address on the local stack); 0: unwrap every one.
    pub filter: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<DecapSettings>() == 8);

/// Counter indices of [`STATS`] (per-CPU u64).
pub mod stat {
    pub const DECAPSULATED: u32 = 0;
    /// Not encapsulated (or not for lb): passed untouched.
    pub const PASS: u32 = 1;
    /// Encapsulated, but to an address that is not an accepted VIP: dropped.
    pub const DROP_NOT_VIP: u32 = 2;
    /// Encapsulated, but the inner header is cut short or not IP: dropped.
    pub const DROP_BAD_INNER: u32 = 3;
    pub const COUNT: u32 = 4;
    pub const NAMES: [&str; COUNT as usize] =
        ["decapsulated", "pass", "drop_not_vip", "drop_bad_inner"];
}
