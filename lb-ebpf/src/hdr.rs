//! Where each header field sits (RFC 894, 791, 8200, 793, 768, 792, 4443), so every packet
//! read and write names the field it touches. Offsets are from the start of that header;
//! ranges are the field's bytes.
use core::ops::Range;

pub mod eth {
    use super::Range;
    pub const DST: Range<usize> = 0..6;
    pub const SRC: Range<usize> = 6..12;
    /// Both MAC addresses.
    pub const MACS: usize = 12;
    pub const TYPE: usize = 12;
    pub const LEN: usize = 14;
    pub const P_IPV4: u16 = 0x0800;
    pub const P_IPV6: u16 = 0x86dd;
}

pub mod ipv4 {
    use super::Range;

    /// An IPv4 address as it sits in a 16-byte address field (its first 4 bytes).
    #[inline(always)]
    pub fn of(a: &[u8; 16]) -> [u8; 4] {
        [a[0], a[1], a[2], a[3]]
    }

    /// Version (high nibble) and header length in words (low nibble).
    pub const VER_IHL: usize = 0;
    pub const TOTAL_LEN: usize = 2;
    /// Flags and fragment offset, one 16-bit word.
    pub const FRAG: usize = 6;
    /// More-fragments flag and fragment offset: non-zero for any fragment.
    pub const FRAG_MASK: u16 = 0x3fff;
    pub const TTL: usize = 8;
    pub const PROTO: usize = 9;
    pub const CHECK: usize = 10;
    pub const SRC: Range<usize> = 12..16;
    pub const DST: Range<usize> = 16..20;
    /// Without options.
    pub const LEN: usize = 20;
}

pub mod ipv6 {
    use super::Range;
    pub const PAYLOAD_LEN: usize = 4;
    pub const NEXT: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC: Range<usize> = 8..24;
    pub const DST: Range<usize> = 24..40;
    pub const LEN: usize = 40;
}

pub mod tcp {
    /// Flag bits of the `FLAGS` byte.
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
    pub const SEQ: usize = 4;
    /// Data offset in words (high nibble).
    pub const DATA_OFF: usize = 12;
    pub const FLAGS: usize = 13;
    pub const CHECK: usize = 16;
    /// Without options.
    pub const LEN: usize = 20;
}

pub mod udp {
    pub const CHECK: usize = 6;
    pub const LEN: usize = 8;
}

/// The ports, first in both TCP and UDP.
pub mod ports {
    pub const LEN: usize = 4;
}

pub mod icmp {
    pub const TYPE: usize = 0;
    pub const CHECK: usize = 2;
    pub const LEN: usize = 8;
}
