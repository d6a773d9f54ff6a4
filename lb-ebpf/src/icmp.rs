//! ICMP on balanced flows. The program forwards frames whole and cannot fragment them, so a
//! packet larger than the egress route's MTU is answered with ICMP "fragmentation needed" /
//! ICMPv6 "packet too big" (RFC 1191, RFC 8201), sent back to its sender from the address the
//! packet was sent to, as a router on the path would. ICMP errors about a balanced flow are
//! translated like the flow's own packets (outer header, quoted header, both checksums) and
//! delivered to the flow's other end, as Linux conntrack does for "related" errors.
use aya_ebpf::{
    EbpfContext as _,
    bindings::xdp_action,
    helpers::{bpf_ktime_get_coarse_ns, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    FAMILY_V4, HOP_TTL_NS, Hop, PROTO_TCP, PROTO_UDP,
    checksum::{fold, replace16, replace32, replace128},
    stat,
};

use crate::{
    fib::{self, FibMiss},
    flow::{self, drop},
    hdr::{self, eth, ipv4, ipv6},
    maps::{FLOWS, FLOWS_NEW, NAT, NAT_NEW, count},
    mem,
    parse::{Packet, ptr_at, zero16},
    scratch::Work,
};

/// How much of the offending packet a "too big" answer quotes: its IP header (IPv4 with up
/// to 40 bytes of options) and the first 8 bytes after it (ports, TCP sequence number),
/// which is what the sender's stack needs to find the socket (RFC 792; Linux reads no more).
/// Every packet that is too big is longer than this (IPv4 MTUs are at least 68, IPv6 1280).
const QUOTE_V4: usize = 68;
const QUOTE_V6: usize = ipv6::LEN + 8;
const ICMP_LEN: usize = hdr::icmp::LEN;
/// Where the answer's headers start: its IP header after Ethernet, then ICMP, then the quote.
const IP_AT: usize = eth::LEN;
const V4_ICMP_AT: usize = IP_AT + ipv4::LEN;
const V6_ICMP_AT: usize = IP_AT + ipv6::LEN;
/// The answer's length; both families come out the same.
const ANSWER_LEN: usize = V4_ICMP_AT + ICMP_LEN + QUOTE_V4;
const _: () = assert!(ANSWER_LEN == V6_ICMP_AT + ICMP_LEN + QUOTE_V6);
/// Hop limit of the answers (Linux's default TTL).
const ANSWER_TTL: u8 = 64;
/// The header offsets came through the scratch map, so the verifier no longer knows their
/// range; the mask restores one (an ICMP header starts at most at 14 + 60).
const L4_OFF_MASK: usize = 0x7f;

const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;

#[inline(always)]
fn pass(reason: u32) -> u32 {
    count(reason);
    xdp_action::XDP_PASS
}

/// Sums the 16-bit words of `f[from..to]` (an even range) onto `acc`.
#[inline(always)]
fn sum_words(f: &[u8; ANSWER_LEN], from: usize, to: usize, mut acc: u32) -> u32 {
    let mut i = from;
    while i + 1 < to {
        acc += u16::from_ne_bytes([f[i], f[i + 1]]) as u32;
        i += 2;
    }
    acc
}

/// True when a frame of this many bytes does not fit a route of `mtu` (0: not known).
#[inline(always)]
pub fn exceeds(frame_len: u64, mtu: u16) -> bool {
    mtu != 0 && frame_len > mtu as u64 + eth::LEN as u64
}

/// Turns the frame, a packet too big for a route of `mtu`, into "fragmentation needed" (IPv4)
/// or "packet too big" (IPv6) to its sender, quoting its first bytes, and sends it back out
/// where it came from. IPv4 packets without DF get the same answer: fragmenting is the kernel's
/// job and this path never hands it a translated packet. Not inlined: rare, and its locals
/// stay out of the forwarding paths' frames.
#[inline(never)]
pub fn too_big(ctx: &XdpContext, pkt: &Packet, mtu: u16) -> Result<u32, u32> {
    let abort = xdp_action::XDP_ABORTED;
    let v4 = pkt.family == FAMILY_V4;
    let head: *const [u8; eth::LEN] = ptr_at(ctx, 0).ok_or(abort)?;
    // SAFETY: ptr_at checked the bounds; copied before the frame moves.
    let old = unsafe { *head };
    let outer = if v4 { ipv4::LEN } else { ipv6::LEN };
    // Room for the new IP and ICMP headers in front; the old headers become the quote.
    // SAFETY: ctx is this program's xdp_md; the helper checks the headroom.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, -((outer + ICMP_LEN) as i32)) } != 0 {
        return Err(abort);
    }
    let len = (ctx.data_end() - ctx.data()) as i32;
    let want = ANSWER_LEN as i32;
    // SAFETY: as above; a frame too big for any MTU is longer than the answer.
    if len < want || unsafe { bpf_xdp_adjust_tail(ctx.as_ptr() as *mut _, want - len) } != 0 {
        return Err(abort);
    }
    let f: *mut [u8; ANSWER_LEN] = ptr_at(ctx, 0).ok_or(abort)?;
    // SAFETY: ptr_at checked the bounds; the frame is ours to modify.
    let f = unsafe { &mut *f };
    // Back to where it came from: the MACs swap.
    f[eth::DST].copy_from_slice(&old[eth::SRC]);
    f[eth::SRC].copy_from_slice(&old[eth::DST]);
    f[eth::TYPE..eth::LEN].copy_from_slice(&old[eth::TYPE..eth::LEN]);
    // From the address the packet was sent to, to its sender.
    if v4 {
        let total = ((ipv4::LEN + ICMP_LEN + QUOTE_V4) as u16).to_be_bytes();
        // Version 4, 5 words; no DF; TTL; protocol; checksum 0 until computed.
        f[IP_AT..IP_AT + ipv4::SRC.start].copy_from_slice(&[
            0x45, 0, total[0], total[1], 0, 0, 0, 0, ANSWER_TTL, PROTO_ICMP, 0, 0,
        ]);
        f[IP_AT + ipv4::SRC.start..IP_AT + ipv4::SRC.end].copy_from_slice(&pkt.dst[..4]);
        f[IP_AT + ipv4::DST.start..IP_AT + ipv4::DST.end].copy_from_slice(&pkt.src[..4]);
        let ip_check = !fold(sum_words(f, IP_AT, V4_ICMP_AT, 0));
        f[IP_AT + ipv4::CHECK..IP_AT + ipv4::CHECK + 2].copy_from_slice(&ip_check.to_ne_bytes());
        let m = mtu.to_be_bytes();
        f[V4_ICMP_AT..V4_ICMP_AT + ICMP_LEN].copy_from_slice(&[
            ICMP_DEST_UNREACH,
            ICMP_FRAG_NEEDED,
            0,
            0,
            0,
            0,
            m[0],
            m[1],
        ]);
        let check = !fold(sum_words(f, V4_ICMP_AT, ANSWER_LEN, 0));
        let at = V4_ICMP_AT + hdr::icmp::CHECK;
        f[at..at + 2].copy_from_slice(&check.to_ne_bytes());
    } else {
        let payload = ((ICMP_LEN + QUOTE_V6) as u16).to_be_bytes();
        // Version 6, no traffic class or flow label; payload length; next header; hop limit.
        f[IP_AT..IP_AT + ipv6::SRC.start].copy_from_slice(&[
            0x60,
            0,
            0,
            0,
            payload[0],
            payload[1],
            PROTO_ICMPV6,
            ANSWER_TTL,
        ]);
        f[IP_AT + ipv6::SRC.start..IP_AT + ipv6::SRC.end].copy_from_slice(&pkt.dst);
        f[IP_AT + ipv6::DST.start..IP_AT + ipv6::DST.end].copy_from_slice(&pkt.src);
        let m = (mtu as u32).to_be_bytes();
        f[V6_ICMP_AT..V6_ICMP_AT + ICMP_LEN].copy_from_slice(&[
            ICMPV6_PACKET_TOO_BIG,
            0,
            0,
            0,
            m[0],
            m[1],
            m[2],
            m[3],
        ]);
        // The pseudo-header: both addresses, the upper-layer length and next header.
        let pseudo = sum_words(f, IP_AT + ipv6::SRC.start, V6_ICMP_AT, 0)
            + u16::from_ne_bytes(payload) as u32
            + u16::from_ne_bytes([0, PROTO_ICMPV6]) as u32;
        let check = !fold(sum_words(f, V6_ICMP_AT, ANSWER_LEN, pseudo));
        let at = V6_ICMP_AT + hdr::icmp::CHECK;
        f[at..at + 2].copy_from_slice(&check.to_ne_bytes());
    }
    count(stat::ICMP_TOO_BIG);
    count(stat::TX);
    Ok(xdp_action::XDP_TX)
}

/// An ICMP error quoting a packet the balancer sent on a flow: from the backend side (quoting
/// SNAT address → backend) it goes to the client, quoting the client's packet to the VIP; from
/// the client side (quoting VIP → client) it goes to the backend, quoting the backend's packet
/// to the SNAT address. Any other ICMP goes to the kernel. Not inlined: rare.
#[inline(never)]
pub fn error(ctx: &XdpContext, w: &mut Work) -> Result<u32, u32> {
    let v4 = w.pkt.family == FAMILY_V4;
    let off = w.pkt.l4_off & L4_OFF_MASK;
    let h: *const [u8; ICMP_LEN] = ptr_at(ctx, off).ok_or_else(|| pass(stat::PASS_ICMP))?;
    // SAFETY: ptr_at checked the bounds.
    let kind = unsafe { (*h)[hdr::icmp::TYPE] };
    let is_error = if v4 {
        kind == ICMP_DEST_UNREACH || kind == ICMP_TIME_EXCEEDED
    } else {
        kind == ICMPV6_DEST_UNREACH || kind == ICMPV6_PACKET_TOO_BIG || kind == ICMPV6_TIME_EXCEEDED
    };
    if !is_error || !quoted(ctx, off + ICMP_LEN, v4, &mut w.inner) {
        return Err(pass(stat::PASS_ICMP));
    }
    // Addressed to the quoted packet's sender, which is this balancer (SNAT address or VIP);
    // an error in transit to someone else is not ours to change.
    if !mem::eq(&w.pkt.dst, &w.inner.src) {
        return Err(pass(stat::PASS_ICMP));
    }
    if w.pkt.ttl <= 1 {
        return Err(pass(stat::PASS_TTL));
    }
    // SAFETY: a helper with no arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let port = u16::from_be(w.inner.sport);
    let mut ifindex = 0;
    if port >= w.s.nat_port_min && port <= w.s.nat_port_max {
        ifindex = from_backend(ctx, w, now)?;
    }
    let reason = if ifindex != 0 {
        stat::ICMP_TO_CLIENT
    } else {
        ifindex = from_client(ctx, w, now)?;
        stat::ICMP_TO_BACKEND
    };
    if ifindex == 0 {
        return Err(pass(stat::PASS_ICMP));
    }
    translate(ctx, w)?;
    count(reason);
    Ok(fib::send(ctx, ifindex))
}

/// Reads the TCP/UDP packet an ICMP error quotes at `at` into `q` (addresses, ports, protocol).
/// False for anything else, and for a quoted IPv4 header with options (no balanced flow sends
/// options the program added; a client's options are quoted back by its own path).
#[inline(always)]
fn quoted(ctx: &XdpContext, at: usize, v4: bool, q: &mut Packet) -> bool {
    zero16(&mut q.src);
    zero16(&mut q.dst);
    let (proto, l4) = if v4 {
        let Some(ip) = ptr_at::<[u8; ipv4::LEN]>(ctx, at) else { return false };
        // SAFETY: ptr_at checked the bounds.
        let ip = unsafe { &*ip };
        if ip[ipv4::VER_IHL] != 0x45 {
            return false;
        }
        q.src[..4].copy_from_slice(&ip[ipv4::SRC]);
        q.dst[..4].copy_from_slice(&ip[ipv4::DST]);
        (ip[ipv4::PROTO], at + ipv4::LEN)
    } else {
        let Some(ip) = ptr_at::<[u8; ipv6::LEN]>(ctx, at) else { return false };
        // SAFETY: ptr_at checked the bounds.
        let ip = unsafe { &*ip };
        if ip[0] >> 4 != 6 {
            return false;
        }
        q.src.copy_from_slice(&ip[ipv6::SRC]);
        q.dst.copy_from_slice(&ip[ipv6::DST]);
        (ip[ipv6::NEXT], at + ipv6::LEN)
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return false;
    }
    let Some(ports) = ptr_at::<[u8; 4]>(ctx, l4) else { return false };
    // SAFETY: ptr_at checked the bounds.
    let ports = unsafe { *ports };
    q.sport = u16::from_ne_bytes([ports[0], ports[1]]);
    q.dport = u16::from_ne_bytes([ports[2], ports[3]]);
    q.proto = proto;
    q.family = if v4 { FAMILY_V4 } else { lb_common::FAMILY_V6 };
    true
}

/// An error from the backend side about SNAT → backend: the flow's NAT entry gives the client's
/// packet to quote (client → VIP, into `w.t`) and the hop toward the client. Returns that hop's
/// interface, or 0 when no flow owns the quoted port.
#[inline(always)]
fn from_backend(ctx: &XdpContext, w: &mut Work, now: u64) -> Result<u32, u32> {
    mem::copy16(&mut w.nk.backend, &w.inner.dst);
    mem::copy16(&mut w.nk.snat, &w.inner.src);
    w.nk.backend_port = w.inner.dport;
    w.nk.nat_port = w.inner.sport;
    w.nk.proto = w.inner.proto;
    w.nk.family = w.inner.family;
    w.nk._pad = 0;
    // SAFETY: plain data, copied out at once.
    let ns = match unsafe { NAT.get(&w.nk) } {
        Some(ns) => ns,
        // SAFETY: as above.
        None => match unsafe { NAT_NEW.get(&w.nk) } {
            Some(ns) => ns,
            None => return Ok(0),
        },
    };
    mem::copy(&mut w.ns, ns);
    if ctx.ingress_ifindex() as u32 != w.ns.backend_ifindex {
        // Like a reply, an error about the backend's leg only counts from the backend's side.
        return Err(drop(stat::DROP_WRONG_IFACE));
    }
    mem::copy16(&mut w.t.src, &w.ns.flow.src);
    mem::copy16(&mut w.t.dst, &w.ns.flow.dst);
    w.t.sport = w.ns.flow.sport;
    w.t.dport = w.ns.flow.dport;
    fresh_hop(ctx, w, now, false)
}

/// An error from the client side about VIP → client: the flow entry gives the backend's packet
/// to quote (backend → SNAT address, into `w.t`) and the hop toward the backend. Returns that
/// hop's interface, or 0 when no live flow matches.
#[inline(always)]
fn from_client(ctx: &XdpContext, w: &mut Work, now: u64) -> Result<u32, u32> {
    mem::copy16(&mut w.key.src, &w.inner.dst);
    mem::copy16(&mut w.key.dst, &w.inner.src);
    w.key.sport = w.inner.dport;
    w.key.dport = w.inner.sport;
    w.key.proto = w.inner.proto;
    w.key.family = w.inner.family;
    w.key._pad = 0;
    // SAFETY: plain data, copied out at once.
    let st = match unsafe { FLOWS.get(&w.key) } {
        Some(st) => st,
        // SAFETY: as above.
        None => match unsafe { FLOWS_NEW.get(&w.key) } {
            Some(st) => st,
            None => return Ok(0),
        },
    };
    mem::copy(&mut w.st, st);
    if !flow::backend(w.st.backend_id, &mut w.be) || w.be.generation != w.st.generation {
        return Ok(0);
    }
    mem::copy16(&mut w.t.src, &w.be.addr);
    mem::copy16(&mut w.t.dst, &w.st.snat);
    w.t.sport = w.be.port;
    w.t.dport = w.st.nat_port;
    fresh_hop(ctx, w, now, true)
}

/// The hop toward the quoted packet's sender (`w.t.src`), from the flow's cache when fresh;
/// its MACs go into `w.t`.
#[inline(always)]
fn fresh_hop(ctx: &XdpContext, w: &mut Work, now: u64, to_backend: bool) -> Result<u32, u32> {
    let hop: &mut Hop = if to_backend { &mut w.st.hop } else { &mut w.ns.hop };
    if hop.ifindex == 0 || now.wrapping_sub(hop.at_ns) > HOP_TTL_NS {
        // An error is advisory: without a usable route it is dropped, never passed on
        // translated (the kernel would see the VIP or SNAT address as a source it owns).
        fib::lookup(ctx, &w.pkt, &w.t.dst, &w.t.src, hop).map_err(|m| match m {
            FibMiss::NoNeigh => drop(stat::DROP_NO_NEIGH),
            FibMiss::Other => drop(stat::DROP_NO_ROUTE),
        })?;
    }
    w.t.smac = hop.smac;
    w.t.dmac = hop.dmac;
    Ok(hop.ifindex)
}

/// Rewrites the error in place: MACs from `w.t`, outer header from the balancer's address
/// (`w.t.dst`) to the quoted packet's sender (`w.t.src`), quoted addresses and ports to `w.t`,
/// with the outer IPv4, quoted IPv4, quoted TCP/UDP (when quoted far enough) and ICMP
/// checksums updated incrementally (RFC 1624). Not inlined: its frame does not stack on the
/// route lookup's.
#[inline(never)]
fn translate(ctx: &XdpContext, w: &Work) -> Result<(), u32> {
    let abort = xdp_action::XDP_ABORTED;
    let (pkt, q, t) = (&w.pkt, &w.inner, &w.t);
    let v4 = pkt.family == FAMILY_V4;
    let eth: *mut [u8; 12] = ptr_at(ctx, 0).ok_or(abort)?;
    // SAFETY: ptr_at checked the bounds; the frame is ours to modify.
    let eth = unsafe { &mut *eth };
    eth[..6].copy_from_slice(&t.dmac);
    eth[6..].copy_from_slice(&t.smac);
    let off = pkt.l4_off & L4_OFF_MASK;
    let icmp_check: *mut [u8; 2] = ptr_at(ctx, off + hdr::icmp::CHECK).ok_or(abort)?;
    // SAFETY: ptr_at checked the bounds.
    let mut ic = u16::from_ne_bytes(unsafe { *icmp_check });
    let inner = off + ICMP_LEN;
    let inner_l4 = inner + if v4 { ipv4::LEN } else { ipv6::LEN };
    // The ICMP checksum covers the quoted header (ICMPv6's also a pseudo-header with the
    // outer addresses).
    ic = readdress(ic, &q.src, &t.src, v4);
    ic = readdress(ic, &q.dst, &t.dst, v4);
    if v4 {
        let ip: *mut [u8; ipv4::LEN] = ptr_at(ctx, eth::LEN).ok_or(abort)?;
        // SAFETY: ptr_at checked the bounds.
        let ip = unsafe { &mut *ip };
        let (check, ttl) = (ipv4::CHECK, ipv4::TTL);
        let mut c = u16::from_ne_bytes([ip[check], ip[check + 1]]);
        c = readdress(readdress(c, &pkt.src, &t.dst, true), &pkt.dst, &t.src, true);
        // TTL shares its checksum word with the protocol.
        let old_ttl = u16::from_ne_bytes([ip[ttl], ip[ttl + 1]]);
        ip[ttl] = pkt.ttl - 1;
        c = replace16(c, old_ttl, u16::from_ne_bytes([ip[ttl], ip[ttl + 1]]));
        ip[check..check + 2].copy_from_slice(&c.to_ne_bytes());
        ip[ipv4::SRC].copy_from_slice(&t.dst[..4]);
        ip[ipv4::DST].copy_from_slice(&t.src[..4]);
        let qip: *mut [u8; ipv4::LEN] = ptr_at(ctx, inner).ok_or(abort)?;
        // SAFETY: ptr_at checked the bounds.
        let qip = unsafe { &mut *qip };
        let old_check = u16::from_ne_bytes([qip[check], qip[check + 1]]);
        let qc = readdress(readdress(old_check, &q.src, &t.src, true), &q.dst, &t.dst, true);
        ic = replace16(ic, old_check, qc);
        qip[check..check + 2].copy_from_slice(&qc.to_ne_bytes());
        qip[ipv4::SRC].copy_from_slice(&t.src[..4]);
        qip[ipv4::DST].copy_from_slice(&t.dst[..4]);
    } else {
        let ip: *mut [u8; ipv6::LEN] = ptr_at(ctx, eth::LEN).ok_or(abort)?;
        // SAFETY: ptr_at checked the bounds.
        let ip = unsafe { &mut *ip };
        ip[ipv6::HOP_LIMIT] = pkt.ttl - 1;
        ic = readdress(readdress(ic, &pkt.src, &t.dst, false), &pkt.dst, &t.src, false);
        ip[ipv6::SRC].copy_from_slice(&t.dst);
        ip[ipv6::DST].copy_from_slice(&t.src);
        let qip: *mut [u8; ipv6::LEN] = ptr_at(ctx, inner).ok_or(abort)?;
        // SAFETY: ptr_at checked the bounds.
        let qip = unsafe { &mut *qip };
        qip[ipv6::SRC].copy_from_slice(&t.src);
        qip[ipv6::DST].copy_from_slice(&t.dst);
    }
    let l4_check_off = if q.proto == PROTO_UDP { hdr::udp::CHECK } else { hdr::tcp::CHECK };
    // Most errors quote only 8 bytes of TCP, which leave its checksum out.
    if let Some(check) = ptr_at::<[u8; 2]>(ctx, inner_l4 + l4_check_off) {
        // SAFETY: ptr_at checked the bounds.
        let old = u16::from_ne_bytes(unsafe { *check });
        if !(q.proto == PROTO_UDP && v4 && old == 0) {
            let mut c = readdress(readdress(old, &q.src, &t.src, v4), &q.dst, &t.dst, v4);
            c = replace16(replace16(c, q.sport, t.sport), q.dport, t.dport);
            if q.proto == PROTO_UDP && c == 0 {
                c = 0xffff;
            }
            ic = replace16(ic, old, c);
            // SAFETY: ptr_at checked the bounds.
            unsafe { *check = c.to_ne_bytes() };
        }
    }
    let ports: *mut [u8; 4] = ptr_at(ctx, inner_l4).ok_or(abort)?;
    ic = replace16(replace16(ic, q.sport, t.sport), q.dport, t.dport);
    let (s, d) = (t.sport.to_ne_bytes(), t.dport.to_ne_bytes());
    // SAFETY: ptr_at checked the bounds.
    unsafe {
        *ports = [s[0], s[1], d[0], d[1]];
        *icmp_check = ic.to_ne_bytes();
    }
    Ok(())
}

/// `check` after an address changed from `old` to `new` (IPv4: the first 4 bytes). A call of
/// its own: six IPv6 address updates inlined in one function overflow BPF's 512-byte stack.
#[inline(never)]
fn readdress(check: u16, old: &[u8; 16], new: &[u8; 16], v4: bool) -> u16 {
    if v4 { replace32(check, ipv4::of(old), ipv4::of(new)) } else { replace128(check, old, new) }
}
