//! Fuzzes the PROXY protocol header parser (v1 and v2) run on trusted sources' first bytes: it
//! must never panic, and every header it accepts must re-encode to one it reads back the same.
#![no_main]

#[path = "../../lb-user/src/l4/proxy_protocol.rs"]
#[allow(dead_code)]
mod proxy_protocol;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(h)) = proxy_protocol::parse(data) {
        assert!(h.len <= data.len(), "claims more bytes than it was given");
        assert_eq!(proxy_protocol::parse(&data[..h.len]), Ok(Some(h)));
        if let Some((src, dst)) = h.addrs {
            for enc in [proxy_protocol::encode_v1(src, dst), proxy_protocol::encode_v2(src, dst)] {
                let back = proxy_protocol::parse(&enc).expect("own encoding parses").expect("whole");
                assert_eq!(back.len, enc.len());
                let (s, d) = back.addrs.expect("addresses");
                // Mixed families come back as IPv6 with the IPv4 address mapped.
                assert_eq!(s.ip().to_canonical(), src.ip().to_canonical());
                assert_eq!((s.port(), d.port()), (src.port(), dst.port()));
                assert_eq!(d.ip().to_canonical(), dst.ip().to_canonical());
            }
        }
    }
});
