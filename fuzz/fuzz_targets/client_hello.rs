//! Fuzzes the ClientHello parser the L4 proxy runs on every TLS connection's first bytes: it
//! must never panic, and its answer must be consistent with the bytes it saw.
#![no_main]

#[path = "../../lb-user/src/l4/sni.rs"]
#[allow(dead_code)]
mod sni;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match sni::parse_client_hello(data) {
        Ok(Some(hello)) => {
            assert!(hello.len <= data.len(), "claims more bytes than it was given");
            // The verdict depends only on the ClientHello's own bytes.
            assert_eq!(sni::parse_client_hello(&data[..hello.len]), Ok(Some(hello.clone())));
            if let Some(host) = &hello.sni {
                assert!(!host.is_empty() && host.bytes().all(|b| b.is_ascii_graphic()));
                assert_eq!(host, &host.to_ascii_lowercase());
            }
            assert!(hello.alpn.iter().all(|p| !p.is_empty()));
        }
        Ok(None) => assert!(data.len() < sni::MAX_PEEK, "wants more past the limit"),
        Err(_) => {}
    }
    // Route matching on whatever host came out of the input never panics either.
    let mut routes = sni::SniRoutes::default();
    routes.insert("*.example.com", 1);
    routes.insert("db.example.com", 2);
    let _ = routes.find(&String::from_utf8_lossy(data).to_ascii_lowercase());
});
