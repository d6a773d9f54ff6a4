//! A plain keep-alive GET through the L7 proxy allocates nothing on the heap in steady state
//! (issue 11 item 2): the proxy runs on a thread of its own whose allocations are counted.
use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if COUNTED.with(Cell::get) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed to the system allocator unchanged; counting touches only an
// atomic and a const-initialised thread local (no allocation of its own).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A keep-alive backend on its own thread: a fixed small response per request head.
fn backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                let mut have = 0;
                loop {
                    let Ok(n) = s.read(&mut buf[have..]) else { return };
                    if n == 0 {
                        return;
                    }
                    have += n;
                    while let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.copy_within(end + 4..have, 0);
                        have -= end + 4;
                        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if s.write_all(r).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

fn get(s: &mut TcpStream) {
    s.write_all(b"GET /x HTTP/1.1\r\nHost: a.test\r\nUser-Agent: t\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"\r\n\r\nok") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "proxy closed the connection");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
}

#[test]
fn keep_alive_get_allocates_nothing_per_request() {
    let config = lb_tests::http::config(&[backend()], "", "");
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let proxy = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            COUNTED.with(|c| c.set(true));
            let p = lb_tests::http::Proxy::start(&config).await;
            addr_tx.send(p.addr()).unwrap();
            let _ = stop_rx.await;
            COUNTED.with(|c| c.set(false));
            p.stop().await;
        });
    });
    let addr = addr_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Warm-up: pools, buffers and the runtime's own lazily built state.
    for _ in 0..500 {
        get(&mut s);
    }
    let before = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..2000 {
        get(&mut s);
    }
    let during = ALLOCS.load(Ordering::Relaxed) - before;
    drop(s);
    stop_tx.send(()).unwrap();
    proxy.join().unwrap();
    assert_eq!(during, 0, "{during} heap allocations over 2000 keep-alive requests");
}
