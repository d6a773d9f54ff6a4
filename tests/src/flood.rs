//! Floods sent from a namespace through a raw IPv4 socket: TCP SYNs and UDP datagrams from
//! spoofed or chosen sources, built with [`crate::packet::Frame`] and bounded in count. The
//! kernel routes them (and fills in the MACs), so they enter the balancer as any client's
//! packets do; hping3 would do the same, but a count of exactly the packets that were sent,
//! and sources the test chooses, come for free here.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::{
    netns::Netns,
    packet::{Frame, TCP_SYN},
};

/// Where spoofed floods come from: 198.18.0.0/15, the benchmarking range (RFC 2544), outside
/// every address the topology uses. [`crate::topology::Topology::route_to_client`] routes it
/// back to the client namespace, which drops the answers (they are for no local address).
pub const SPOOFED: &str = "198.18.0.0/15";
const SPOOFED_BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
/// Addresses in [`SPOOFED`].
const SPOOFED_SIZE: u32 = 1 << 17;

/// What a flood sent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sent {
    pub packets: u64,
    /// Sends the kernel refused (a full queue): not on the wire.
    pub refused: u64,
    pub elapsed: Duration,
}

impl Sent {
    /// Both counts, one flood after another.
    pub fn add(&mut self, other: Sent) {
        self.packets += other.packets;
        self.refused += other.refused;
        self.elapsed += other.elapsed;
    }

    /// Packets per second while it ran.
    pub fn rate(&self) -> f64 {
        self.packets as f64 / self.elapsed.as_secs_f64().max(1e-6)
    }
}

/// TCP SYNs to `target`, the `i`-th (for each `i` of `range`) from the `i`-th spoofed source
/// in [`SPOOFED`], with source ports and sequence numbers varied as a flood tool's would be.
pub fn spoofed_syns(range: std::ops::Range<u32>, target: SocketAddr) -> Vec<Frame> {
    range
        .map(|i| {
            let mut f = Frame::tcp(spoofed(i), sport(i), target.ip(), target.port(), TCP_SYN);
            f.seq = i.wrapping_mul(2_654_435_761);
            f
        })
        .collect()
}

/// UDP datagrams of `payload` to `target`, as [`spoofed_syns`] numbers them.
pub fn spoofed_udp(range: std::ops::Range<u32>, target: SocketAddr, payload: &[u8]) -> Vec<Frame> {
    range.map(|i| Frame::udp(spoofed(i), sport(i), target.ip(), target.port(), payload)).collect()
}

/// The `i`-th address of [`SPOOFED`] (wrapping round it).
fn spoofed(i: u32) -> IpAddr {
    Ipv4Addr::from(SPOOFED_BASE + i % SPOOFED_SIZE).into()
}

/// A source port in 1024..=65535 that differs between neighbouring `i`.
fn sport(i: u32) -> u16 {
    (1024 + i.wrapping_mul(7919) % 64_512) as u16
}

/// TCP SYNs to `target` from `src`, one from each port of `sports`: a client that opens
/// connections and never finishes them (with [`drop_synacks`] on those ports, it drops the
/// SYN-ACKs instead of resetting them, as its kernel would for a port with no socket).
pub fn syns_from(src: IpAddr, sports: std::ops::Range<u16>, target: SocketAddr) -> Vec<Frame> {
    sports.map(|p| Frame::tcp(src, p, target.ip(), target.port(), TCP_SYN)).collect()
}

/// Makes `ns` drop incoming SYN-ACKs to local ports `first..=last` (nftables, gone with the
/// namespace).
pub fn drop_synacks(ns: &Netns, first: u16, last: u16) -> anyhow::Result<()> {
    ns.exec(&["nft", "add table ip lbtest"])?;
    ns.exec(&["nft", "add chain ip lbtest in { type filter hook input priority 0 ; }"])?;
    let rule = format!(
        "add rule ip lbtest in tcp dport {first}-{last} tcp flags & (syn | ack) == syn | ack drop"
    );
    ns.exec(&["nft", &rule]).map(drop)
}

/// Packets sent between two looks at the clock when pacing.
const PACE_BATCH: u64 = 32;

/// Sends every frame (its IPv4 packet; the Ethernet header is the kernel's) from `ns` at about
/// `rate` packets per second: the frames are built beforehand, so the loop is only `sendto`
/// and the pause that keeps it to the rate. Unpaced, a raw socket outruns the veth pair: the
/// receiving queue (256 frames) overflows whenever the balancer's softirq work is deferred to
/// ksoftirqd, and most of the flood is dropped before the XDP program sees it.
pub fn send(ns: &Netns, frames: &[Frame], rate: u64) -> anyhow::Result<Sent> {
    let mut packets = Vec::with_capacity(frames.len());
    for f in frames {
        let IpAddr::V4(dst) = f.dst else { bail!("flood::send sends IPv4 only, not {}", f.dst) };
        packets.push((f.bytes().split_off(14), SockAddr::from(SocketAddr::new(dst.into(), 0))));
    }
    let sock = ns
        .run(|| {
            // IPPROTO_RAW implies IP_HDRINCL: the packet goes out as built, spoofed source included.
            Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))
        })?
        .context("raw socket (needs CAP_NET_RAW)")?;
    let start = Instant::now();
    let mut sent = Sent { packets: 0, refused: 0, elapsed: Duration::ZERO };
    for (i, (bytes, to)) in packets.iter().enumerate() {
        let i = i as u64;
        if i.is_multiple_of(PACE_BATCH) {
            let due = Duration::from_secs_f64(i as f64 / rate.max(1) as f64);
            if let Some(ahead) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
        match sock.send_to(bytes, to) {
            Ok(_) => sent.packets += 1,
            // ENOBUFS: the device queue was full; the packet is lost, as a flood's would be.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => sent.refused += 1,
            Err(e) => return Err(e).context("sendto on the raw socket"),
        }
    }
    sent.elapsed = start.elapsed();
    Ok(sent)
}
