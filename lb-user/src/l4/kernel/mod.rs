//! The kernel relay (`relay = "kernel"`): once a connection's backend is connected, both sockets
//! join a sockhash whose stream verdict program (the `lb-relay` object) redirects each one's
//! received bytes to the other's send queue inside the kernel. Userspace does nothing per
//! exchange: it waits for end-of-stream or an error on either socket, half-closes the peer once
//! everything redirected before the FIN has reached the peer's send queue, reads the program's
//! counters on a timer (byte counters, idle timeout), and takes both sockets out at the end.
//!
//! Bytes that arrived before a socket joined (a peeked ClientHello, anything after a PROXY
//! header) are still in its receive queue: setting `SO_RCVLOWAT` runs the joined socket's
//! data-ready callback, which feeds that queue to the verdict program first, in order.
mod conn;

use std::{
    io,
    sync::{Mutex, OnceLock},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, SockHash},
    programs::SkSkb,
};
use lb_common::relay::{self, RelayCounts, RelayPeer};

use crate::config::Relay;
pub use conn::{NotJoined, relay};

/// The `lb-relay` object: the verdict program and its maps, nothing of the XDP program.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-relay"));

/// The loaded program and its maps, shared by every listener of the process.
pub struct KernelRelay {
    maps: Mutex<Maps>,
}

struct Maps {
    socks: SockHash<MapData, u64>,
    targets: SockHash<MapData, u64>,
    peers: HashMap<MapData, u64, RelayPeer>,
    counts: HashMap<MapData, u64, RelayCounts>,
    // Owns the program and its attachment to `socks`; dropping it detaches.
    _ebpf: Ebpf,
}

static RELAY: OnceLock<Result<KernelRelay, String>> = OnceLock::new();

/// The process's kernel relay, loaded on first use; the error says why it is unavailable (and
/// is logged once, the first time it is asked for).
pub fn get() -> Result<&'static KernelRelay, &'static str> {
    RELAY
        .get_or_init(|| {
            let r = KernelRelay::load().map_err(|e| {
                // aya's messages leave the cause (EPERM: not root, no CAP_BPF) to `source`.
                let mut why = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    why = format!("{why}: {c}");
                    cause = c.source();
                }
                why
            });
            if let Err(e) = &r {
                log::warn!("kernel relay unavailable, tcp listeners splice or copy: {e}");
            }
            r
        })
        .as_ref()
        .map_err(String::as_str)
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the relay program: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the relay object has no {0}")]
    Missing(&'static str),
    #[error("relay map: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("relay program: {0}")]
    Program(#[from] aya::programs::ProgramError),
}

impl KernelRelay {
    fn load() -> Result<Self, LoadError> {
        // Needs CAP_BPF and CAP_NET_ADMIN (root): an unprivileged daemon fails here, at once.
        let mut ebpf = EbpfLoader::new().load(OBJECT)?;
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(LoadError::Missing(name))
        };
        let socks: SockHash<MapData, u64> = take(&mut ebpf, relay::maps::SOCKS)?.try_into()?;
        let targets: SockHash<MapData, u64> = take(&mut ebpf, relay::maps::TARGETS)?.try_into()?;
        let peers: HashMap<MapData, u64, RelayPeer> =
            take(&mut ebpf, relay::maps::PEERS)?.try_into()?;
        let counts: HashMap<MapData, u64, RelayCounts> =
            take(&mut ebpf, relay::maps::COUNTS)?.try_into()?;
        let prog: &mut SkSkb = ebpf
            .program_mut(relay::PROGRAM)
            .ok_or(LoadError::Missing(relay::PROGRAM))?
            .try_into()?;
        prog.load()?;
        prog.attach(socks.fd())?;
        Ok(Self { maps: Mutex::new(Maps { socks, targets, peers, counts, _ebpf: ebpf }) })
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn counts(&self, cookie: u64) -> Option<RelayCounts> {
        self.maps().counts.get(&cookie, 0).ok()
    }

    fn set_peer(&self, cookie: u64, peer: RelayPeer) -> io::Result<()> {
        self.maps().peers.insert(cookie, peer, 0).map_err(io::Error::other)
    }
}

/// How a listener's connections are relayed, decided once when the listener is built.
#[derive(Clone, Copy)]
pub enum Mode {
    Kernel(&'static KernelRelay),
    /// Userspace; `zero_copy` false means copy only.
    User {
        zero_copy: bool,
    },
}

impl Mode {
    /// The mode for a listener and what `lb status` says about it: `kernel`, `splice`, `copy`,
    /// or the userspace mode followed by why the kernel relay is not used.
    pub fn choose(relay: Option<Relay>, zero_copy: bool) -> (Self, String) {
        let user = |zero_copy: bool| {
            (Self::User { zero_copy }, if zero_copy { "splice" } else { "copy" }.to_string())
        };
        match relay {
            Some(Relay::Copy) => user(false),
            // The default stays the userspace relay: measured side by side (BENCHMARKS.md
            // `l4user`), the kernel relay is slower on every axis so far.
            Some(Relay::Splice) | None => user(zero_copy),
            Some(Relay::Kernel) => match get() {
                Ok(k) => (Self::Kernel(k), "kernel".into()),
                Err(why) => {
                    let (mode, name) = user(zero_copy);
                    (mode, format!("{name} (kernel relay unavailable: {why})"))
                }
            },
        }
    }
}
