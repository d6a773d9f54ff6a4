//! Internet checksum arithmetic (RFC 1071, incremental update per RFC 1624).
//!
//! Shared by the XDP program, which rewrites headers, and by tests, which check its output with an
//! independent full computation. All values are the ones' complement sums over 16-bit words as
//! they sit in memory (network order read as native u16), so no byte swapping is needed.

/// Folds a 32-bit accumulator into 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 eqn. 3: new checksum after a 16-bit word changed from `old` to `new`.
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check as u32) + (!old as u32) + (new as u32);
    !fold(sum)
}

/// New checksum after a 32-bit field (two words) changed.
#[inline(always)]
pub fn replace32(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let o = u32::from_ne_bytes(old);
    let n = u32::from_ne_bytes(new);
    let mut sum = !check as u32;
    sum += (!(o as u16)) as u32 + (!((o >> 16) as u16)) as u32;
    sum += (n as u16) as u32 + ((n >> 16) as u16) as u32;
    !fold(sum)
}

/// New checksum after a 128-bit field (an IPv6 address) changed.
#[inline(always)]
pub fn replace128(check: u16, old: &[u8; 16], new: &[u8; 16]) -> u16 {
    let mut c = check;
    let mut i = 0;
    while i < 16 {
        c = replace32(
            c,
            [old[i], old[i + 1], old[i + 2], old[i + 3]],
            [new[i], new[i + 1], new[i + 2], new[i + 3]],
        );
        i += 4;
    }
    c
}

/// Ones' complement sum of `data` (odd trailing byte padded with zero), not yet inverted.
pub fn sum(data: &[u8], initial: u32) -> u32 {
    let mut acc = initial as u64;
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        acc += u16::from_ne_bytes([w[0], w[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        acc += u16::from_ne_bytes([*last, 0]) as u64;
    }
    while acc >> 32 != 0 {
        acc = (acc & 0xffff_ffff) + (acc >> 32);
    }
    acc as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(data: &[u8]) -> u16 {
        !fold(sum(data, 0))
    }

    #[test]
    fn incremental_matches_full_recompute() {
        // An IPv4 header with a valid checksum (example from RFC 1071 style data).
        let mut hdr = [
            0x45u8, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        let c = full(&hdr);
        hdr[10..12].copy_from_slice(&c.to_ne_bytes());
        assert_eq!(full(&hdr), 0, "header with its checksum sums to zero");

        let new_dst = [10u8, 1, 0, 2];
        let old_dst: [u8; 4] = hdr[16..20].try_into().unwrap();
        let updated = replace32(c, old_dst, new_dst);
        hdr[16..20].copy_from_slice(&new_dst);
        hdr[10..12].copy_from_slice(&0u16.to_ne_bytes());
        assert_eq!(updated, full(&hdr));
    }

    #[test]
    fn replace16_and_128_match_full_recompute() {
        let mut data = [0u8; 40];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(11);
        }
        let c = full(&data);
        let old: [u8; 16] = data[8..24].try_into().unwrap();
        let new = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 1];
        data[8..24].copy_from_slice(&new);
        let c2 = replace128(c, &old, &new);
        assert_eq!(c2, full(&data));
        let old16 = u16::from_ne_bytes([data[30], data[31]]);
        let new16 = 0x1f90u16.to_be();
        data[30..32].copy_from_slice(&new16.to_ne_bytes());
        assert_eq!(replace16(c2, old16, new16), full(&data));
    }
}
