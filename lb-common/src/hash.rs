//! The flow hash: which Maglev slot a client lands in. The XDP program and the userspace L4
//! proxy both call these functions, so one client reaches the same backend whichever path
//! serves it. The mixing is murmur3's finaliser over 32-bit words: cheap in BPF (no loops over
//! bytes, no tables) and well spread. Changing it moves every client; a golden test pins it.

const SEED: u32 = 0x9747_b28c;

#[inline(always)]
fn mix(mut h: u32, k: u32) -> u32 {
    let mut k = k.wrapping_mul(0xcc9e_2d51);
    k = k.rotate_left(15);
    k = k.wrapping_mul(0x1b87_3593);
    h ^= k;
    h = h.rotate_left(13);
    h.wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn finish(mut h: u32, len: u32) -> u32 {
    h ^= len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
fn word(b: &[u8; 16], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Hash of a client address (network order bytes; IPv4 in the first 4, rest zero).
#[inline(always)]
pub fn source_hash(addr: &[u8; 16]) -> u32 {
    let mut h = SEED;
    h = mix(h, word(addr, 0));
    h = mix(h, word(addr, 4));
    h = mix(h, word(addr, 8));
    h = mix(h, word(addr, 12));
    finish(h, 16)
}

/// Hash of a whole flow: addresses as in [`source_hash`], ports in network order.
#[inline(always)]
pub fn five_tuple_hash(src: &[u8; 16], dst: &[u8; 16], sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = SEED;
    h = mix(h, word(src, 0));
    h = mix(h, word(src, 4));
    h = mix(h, word(src, 8));
    h = mix(h, word(src, 12));
    h = mix(h, word(dst, 0));
    h = mix(h, word(dst, 4));
    h = mix(h, word(dst, 8));
    h = mix(h, word(dst, 12));
    h = mix(h, (sport as u32) | ((dport as u32) << 16));
    h = mix(h, proto as u32);
    finish(h, 40)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_values_pin_the_hash() {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[10, 0, 0, 2]);
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&[10, 200, 0, 1]);
        // If these change, every client moves to another backend on upgrade.
        assert_eq!(source_hash(&a), 3_979_523_173);
        assert_eq!(five_tuple_hash(&a, &b, 40000u16.to_be(), 80u16.to_be(), 6), 2_720_715_924);
    }
}
