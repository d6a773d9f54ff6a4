//! Connection tracking and backend choice. Only new flows (TCP SYN, UDP after idle) consult the
//! Maglev ring; everything else follows its tracked state, so a backend-set change never moves
//! an established flow.
use aya_ebpf::{bindings::xdp_action, helpers::bpf_get_prandom_u32, programs::XdpContext};
use lb_common::{
    BACKEND_F_ACTIVE, BackendInfo, DEFAULT_NAT_PORT_MAX, DEFAULT_NAT_PORT_MIN,
    DEFAULT_TCP_CLOSED_NS, DEFAULT_UDP_IDLE_NS, FAMILY_V4, FLOW_F_FIN_BACKEND, FLOW_F_FIN_CLIENT,
    FLOW_F_RST, FlowState, PROTO_TCP, RING_SIZE, Settings, VIP_F_FIVE_TUPLE, VipInfo,
    hash::{five_tuple_hash, source_hash},
    stat,
};

use crate::{
    fib::{self, FibMiss},
    maps::{BACKENDS, FLOWS, IFACES, NAT, PORT_CURSOR, RING, SETTINGS, count},
    mem,
    parse::Packet,
    scratch::Work,
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// Ports tried per new flow before giving up (each try is one atomic insert).
const MAX_PORT_TRIES: u32 = 8;
const BPF_NOEXIST: u64 = 1;
/// last_seen is rewritten at most this often, to keep the cache line quiet.
const TOUCH_NS: u64 = 100_000_000;

#[inline(always)]
fn drop(reason: u32) -> u32 {
    count(reason);
    xdp_action::XDP_DROP
}

/// Loads the settings the daemon wrote (or the defaults before it has) into `s`.
#[inline(always)]
pub fn load_settings(s: &mut Settings) {
    match SETTINGS.get(0) {
        Some(v) if v.nat_port_max != 0 => mem::copy(s, v),
        _ => {
            s.udp_idle_ns = DEFAULT_UDP_IDLE_NS;
            s.tcp_closed_ns = DEFAULT_TCP_CLOSED_NS;
            s.nat_port_min = DEFAULT_NAT_PORT_MIN;
            s.nat_port_max = DEFAULT_NAT_PORT_MAX;
            s.cpus = 1;
        }
    }
}

/// Fills `w.key` with the packet's client-side flow key.
#[inline(always)]
pub fn make_key(w: &mut Work) {
    mem::copy16(&mut w.key.src, &w.pkt.src);
    mem::copy16(&mut w.key.dst, &w.pkt.dst);
    w.key.sport = w.pkt.sport;
    w.key.dport = w.pkt.dport;
    w.key.proto = w.pkt.proto;
    w.key.family = w.pkt.family;
    w.key._pad = 0;
}

/// The flag bits a packet adds to its flow's state.
#[inline(always)]
pub fn flags_of(pkt: &Packet, fin_bit: u32) -> u32 {
    let mut f = 0;
    if pkt.tcp_flags & TCP_FIN != 0 {
        f |= fin_bit;
    }
    if pkt.tcp_flags & TCP_RST != 0 {
        f |= FLOW_F_RST;
    }
    f
}

/// A client SYN that opens a connection (not a SYN-ACK).
#[inline(always)]
pub fn is_syn(pkt: &Packet) -> bool {
    pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

pub enum Tracked {
    /// A live flow: keep following it.
    Live(*mut FlowState),
    /// A flow that ended (closed, idle, or a SYN reusing the tuple), copied into `w.st`: a new
    /// one may replace it.
    Ended,
    Unknown,
}

/// Looks `w.key` up and decides whether the flow is still live.
#[inline(always)]
pub fn lookup(w: &mut Work, now: u64) -> Tracked {
    let Some(ptr) = FLOWS.get_ptr_mut(&w.key) else {
        return Tracked::Unknown;
    };
    // SAFETY: a valid map value; concurrent writers only set flag bits and timestamps.
    let (flags, last) = unsafe { ((*ptr).flags, (*ptr).last_seen_ns) };
    // A SYN on a closing TCP flow is the client reusing the tuple: a new connection.
    let reused = w.pkt.proto == PROTO_TCP
        && is_syn(&w.pkt)
        && flags & (FLOW_F_FIN_CLIENT | FLOW_F_FIN_BACKEND | FLOW_F_RST) != 0;
    if reused || is_over(w.pkt.proto, flags, last, now, &w.s) {
        // SAFETY: as above.
        mem::copy(&mut w.st, unsafe { &*ptr });
        Tracked::Ended
    } else {
        Tracked::Live(ptr)
    }
}

/// Records a packet on a live flow: new FIN/RST bits, and the time (rate-limited). Racing
/// updates from other CPUs are benign: bits only get set, and any recent timestamp will do.
#[inline(always)]
pub fn touch(st: &mut FlowState, add_flags: u32, now: u64) {
    if add_flags & !st.flags != 0 {
        st.flags |= add_flags;
        st.last_seen_ns = now;
    } else if now.saturating_sub(st.last_seen_ns) > TOUCH_NS {
        st.last_seen_ns = now;
    }
}

/// Copies the backend with id `id` into `out` if the slot is live.
#[inline(always)]
pub fn backend(id: u32, out: &mut BackendInfo) -> bool {
    match BACKENDS.get(id) {
        Some(b) if b.flags & BACKEND_F_ACTIVE != 0 => {
            mem::copy(out, b);
            true
        }
        _ => false,
    }
}

/// Routes toward `w.be` (from `w.st.snat`, or from the client for a new flow) into
/// `w.st.hop`.
#[inline(always)]
pub fn route_to_backend(
    ctx: &XdpContext,
    w: &mut Work,
    from_client: bool,
    now: u64,
) -> Result<(), u32> {
    let src = if from_client { &w.pkt.src } else { &w.st.snat };
    fib::lookup(ctx, &w.pkt, src, &w.be.addr, &mut w.st.hop).map_err(|m| match m {
        FibMiss::NoNeigh => drop(stat::DROP_NO_NEIGH),
        FibMiss::Other => drop(stat::DROP_NO_ROUTE),
    })?;
    w.st.hop.at_ns = now;
    Ok(())
}

/// A new flow: pick the backend from the Maglev ring, route to it, take a SNAT address and a
/// free SNAT port, and record both directions. Leaves `w.st` and `w.be` filled. Not
/// inlined, to keep its locals out of the established path's stack frame.
#[inline(never)]
pub fn create(ctx: &XdpContext, w: &mut Work, vip: &VipInfo, now: u64) -> Result<(), u32> {
    let hash = if vip.flags & VIP_F_FIVE_TUPLE != 0 {
        five_tuple_hash(&w.pkt.src, &w.pkt.dst, w.pkt.sport, w.pkt.dport, w.pkt.proto)
    } else {
        source_hash(&w.pkt.src)
    };
    let slot = vip.service_id * RING_SIZE + hash % RING_SIZE;
    let id = match RING.get(slot) {
        Some(&id) if id != 0 => id,
        _ => return Err(drop(stat::DROP_NO_BACKEND)),
    };
    if !backend(id, &mut w.be) {
        return Err(drop(stat::DROP_NO_BACKEND));
    }
    // Route with the client as source first: it names the egress interface, whose own address
    // becomes the SNAT source.
    route_to_backend(ctx, w, true, now)?;
    let addrs = IFACES.get_ptr(w.st.hop.ifindex).ok_or_else(|| drop(stat::DROP_NO_SNAT_ADDR))?;
    crate::parse::zero16(&mut w.st.snat);
    // SAFETY: a valid map value.
    unsafe {
        if w.pkt.family == FAMILY_V4 {
            w.st.snat[..4].copy_from_slice(&(*addrs).v4);
        } else {
            mem::copy16(&mut w.st.snat, &(*addrs).v6);
        }
    }
    if w.st.snat == [0u8; 16] {
        return Err(drop(stat::DROP_NO_SNAT_ADDR));
    }
    mem::copy16(&mut w.nk.backend, &w.be.addr);
    mem::copy16(&mut w.nk.snat, &w.st.snat);
    w.nk.backend_port = w.be.port;
    w.nk.proto = w.pkt.proto;
    w.nk.family = w.pkt.family;
    w.nk._pad = 0;
    mem::copy(&mut w.ns.flow, &w.key);
    w.ns.backend_id = id;
    w.ns.service_id = vip.service_id;
    // The client-side hop is looked up on the first reply.
    w.ns.hop.at_ns = 0;
    alloc_port(w)?;
    w.st.backend_id = id;
    w.st.generation = w.be.generation;
    w.st.nat_port = w.nk.nat_port;
    w.st._pad = 0;
    w.st.flags = flags_of(&w.pkt, FLOW_F_FIN_CLIENT);
    w.st.last_seen_ns = now;
    if FLOWS.insert(&w.key, &w.st, 0).is_err() {
        let _ = NAT.remove(&w.nk);
        return Err(drop(stat::DROP_MAP_FULL));
    }
    Ok(())
}

/// Claims a SNAT port for `w.nk` with an atomic insert-if-absent, so two CPUs never share one.
///
/// The first choice is a fixed function of the client's address and port. Backends keep
/// closed connections in TIME_WAIT for 60 s and accept a new SYN on the same 4-tuple only if
/// its TCP timestamp is newer; timestamps are consistent per client 4-tuple, so mapping the same
/// client tuple to the same SNAT port keeps reuse acceptable, where a port handed to a
/// *different* client tuple would be refused now and then (a 1 s stall for that client). The
/// fallbacks walk a per-CPU cursor (randomly seeded) over the whole range.
#[inline(always)]
fn alloc_port(w: &mut Work) -> Result<(), u32> {
    let range = (w.s.nat_port_max as u32).saturating_sub(w.s.nat_port_min as u32) + 1;
    let preferred = source_hash(&w.pkt.src).wrapping_add(u16::from_be(w.pkt.sport) as u32);
    if try_port(w, preferred % range, false) {
        return Ok(());
    }
    let cursor = PORT_CURSOR.get_ptr_mut(0).ok_or_else(|| drop(stat::DROP_NO_PORT))?;
    // SAFETY: per-CPU slot; only this CPU touches it while this program runs.
    unsafe {
        if *cursor == 0 {
            // A fresh table starts at a random point, not where a previous instance started:
            // backends may still hold those ports in TIME_WAIT.
            *cursor = bpf_get_prandom_u32() | 1;
        }
    }
    // Free ports first; only then ports held by finished flows of other clients, which the
    // backend may still keep in TIME_WAIT for the old 4-tuple (it would refuse the new SYN).
    for i in 0..2 * MAX_PORT_TRIES {
        // SAFETY: per-CPU slot; only this CPU touches it while this program runs.
        let c = unsafe {
            let c = *cursor;
            *cursor = c.wrapping_add(1);
            c
        };
        if try_port(w, c % range, i >= MAX_PORT_TRIES) {
            return Ok(());
        }
    }
    Err(drop(stat::DROP_NO_PORT))
}

/// Tries SNAT port `nat_port_min + offset`: free, or held by a finished flow (reclaimed when
/// that flow was this client tuple's, or `any_dead`).
#[inline(always)]
fn try_port(w: &mut Work, offset: u32, any_dead: bool) -> bool {
    w.nk.nat_port = ((w.s.nat_port_min as u32 + offset) as u16).to_be();
    if NAT.insert(&w.nk, &w.ns, BPF_NOEXIST).is_ok() {
        return true;
    }
    // Taken. If the flow holding it is over, reclaim the port: delete, then the same atomic
    // insert-if-absent, so two CPUs reclaiming at once cannot both win.
    if holder_is_dead(w, any_dead) {
        let _ = NAT.remove(&w.nk);
        if NAT.insert(&w.nk, &w.ns, BPF_NOEXIST).is_ok() {
            count(stat::PORT_RECLAIMED);
            return true;
        }
    }
    false
}

/// True when the flow that holds the NAT entry `w.nk` has ended (gone from the flow table,
/// closed for longer than the grace time, or UDP idle) and was this client tuple's unless
/// `any_holder`. Without this, ports of finished flows would stay taken until LRU eviction.
#[inline(always)]
fn holder_is_dead(w: &Work, any_holder: bool) -> bool {
    // SAFETY: a valid map value; only its flow key is read.
    let Some(holder) = (unsafe { NAT.get(&w.nk) }) else {
        return true;
    };
    if !any_holder && !mem::eq(&holder.flow, &w.key) {
        return false;
    }
    let Some(st) = FLOWS.get_ptr(&holder.flow) else {
        return true;
    };
    // SAFETY: a valid map value; two fields are read.
    let (flags, last) = unsafe { ((*st).flags, (*st).last_seen_ns) };
    is_over(holder.flow.proto, flags, last, w.now, &w.s)
}

/// True when a flow with these flags, last seen at `last`, has ended: TCP closed (RST, or FIN
/// both ways) for longer than the grace time, or UDP idle past its timeout.
#[inline(always)]
fn is_over(proto: u8, flags: u32, last: u64, now: u64, s: &Settings) -> bool {
    let idle = now.saturating_sub(last);
    if proto == PROTO_TCP {
        let fins = FLOW_F_FIN_CLIENT | FLOW_F_FIN_BACKEND;
        let closed = flags & FLOW_F_RST != 0 || flags & fins == fins;
        // `>=`: with the coarse clock a zero grace time must still mean "at once".
        closed && idle >= s.tcp_closed_ns
    } else {
        idle >= s.udp_idle_ns
    }
}

/// Forgets the reverse entry of the flow that ended (in `w.st`).
#[inline(always)]
pub fn forget(w: &mut Work) {
    if backend(w.st.backend_id, &mut w.be) {
        mem::copy16(&mut w.nk.backend, &w.be.addr);
        mem::copy16(&mut w.nk.snat, &w.st.snat);
        w.nk.backend_port = w.be.port;
        w.nk.nat_port = w.st.nat_port;
        w.nk.proto = w.pkt.proto;
        w.nk.family = w.pkt.family;
        w.nk._pad = 0;
        let _ = NAT.remove(&w.nk);
    }
}
