//! Conversions between config addresses and the kernel's map keys.
use std::net::{IpAddr, SocketAddr};

use lb_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, VipKey};

use crate::config::Protocol;

/// The `LB_VIPS` key of a service.
pub fn vip_key(vip: SocketAddr, protocol: Protocol) -> VipKey {
    let mut addr = [0u8; 16];
    let family = match vip.ip() {
        IpAddr::V4(a) => {
            addr[..4].copy_from_slice(&a.octets());
            FAMILY_V4
        }
        IpAddr::V6(a) => {
            addr = a.octets();
            FAMILY_V6
        }
    };
    let proto = match protocol {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
    };
    VipKey { addr, port: vip.port().to_be(), proto, family, _pad: [0; 4] }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_bytes_are_in_network_order() {
        let k = vip_key("10.0.0.100:80".parse().unwrap(), Protocol::Tcp);
        assert_eq!(&k.addr[..4], &[10, 0, 0, 100]);
        assert_eq!(k.addr[4..], [0u8; 12]);
        assert_eq!(k.port.to_ne_bytes(), [0, 80]);
        assert_eq!((k.proto, k.family), (6, 4));
        let k = vip_key("[2001:db8::1]:443".parse().unwrap(), Protocol::Udp);
        assert_eq!(k.addr[0..2], [0x20, 0x01]);
        assert_eq!(k.addr[15], 1);
        assert_eq!((k.proto, k.family), (17, 6));
    }
}
