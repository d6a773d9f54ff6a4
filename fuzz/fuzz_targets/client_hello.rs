//! Fuzzes the ClientHello parser the L4 proxy runs on every TLS connection's first bytes: it
//! must never panic, and its answer must be consistent with the bytes it saw.
#![no_main]

#[path = "../../lb-user/src/l4/sni.rs"]
#[allow(dead_code)]
mod sni;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = sni::parse_client_hello(data);
    // Fed in pieces (cut where the first byte says, then at what the reader wants, as the peek
    // does), the reader gives the same answer as for the whole.
    let mut reader = sni::HelloReader::default();
    let mut at = 0;
    let mut cut = data.first().map_or(0, |&b| b as usize % 17 + 1);
    let fed = loop {
        let end = (at + cut.max(1)).min(data.len());
        match reader.feed(&data[at..end]) {
            Ok(None) if end < data.len() => at = end,
            done => break done,
        }
        cut = reader.wants().min(cut * 2 + 1);
    };
    assert_eq!(fed, whole, "split feeding disagrees with the whole");
    match whole {
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
