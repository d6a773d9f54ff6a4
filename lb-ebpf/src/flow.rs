//! Connection tracking and backend choice. Only new flows (TCP SYN, UDP after idle) consult the
//! Maglev ring; everything else follows its tracked state, so a backend-set change never moves
//! an established flow.
use aya_ebpf::{bindings::xdp_action, maps::LruHashMap, programs::XdpContext};
use lb_common::{
    BACKEND_F_ACTIVE, BackendInfo, DEFAULT_NAT_PORT_MAX, DEFAULT_NAT_PORT_MIN,
    DEFAULT_TCP_CLOSED_NS, DEFAULT_TCP_IDLE_NS, DEFAULT_TCP_SYN_NS, DEFAULT_UDP_IDLE_NS,
    FLOW_F_CONFIRMED, FLOW_F_DSR, FLOW_F_FIN_BACKEND, FLOW_F_FIN_CLIENT, FLOW_F_GUE, FLOW_F_RST,
    FLOW_F_SYNACK, FlowState, NatKey, NatState, PROTO_TCP, RING_SIZE, Settings, VIP_F_DSR,
    VIP_F_FIVE_TUPLE, VIP_F_GUE, VipInfo,
    hash::{five_tuple_hash, source_hash},
    stat,
};

use crate::{
    encap,
    fib::{self, FibMiss},
    maps::{BACKENDS, FLOWS, FLOWS_NEW, NAT, NAT_NEW, RING, SETTINGS, count},
    mem,
    parse::Packet,
    scratch::Work,
    snat,
};

use crate::hdr::tcp::{ACK as TCP_ACK, FIN as TCP_FIN, RST as TCP_RST, SYN as TCP_SYN};
/// How far from the client's next sequence number (as this program saw it) an RST may be
/// and still end the flow: the RFC 793 window check conntrack also makes (a backend on
/// Linux resets only on an exact match, RFC 5961), with a 64 KiB window. A blind attacker has
/// to hit it out of 2^32.
const RST_WINDOW: u32 = 65_535;
/// How far ahead of or behind `client_next` a segment may start and still move it:
/// retransmissions and reordering before the balancer stay well inside this.
const ADVANCE_WINDOW: u32 = 1 << 20;
/// last_seen is rewritten at most this often, to keep the cache line quiet.
pub const TOUCH_NS: u64 = 100_000_000;

#[inline(always)]
pub fn drop(reason: u32) -> u32 {
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
            s.tcp_syn_ns = DEFAULT_TCP_SYN_NS;
            s.tcp_idle_ns = DEFAULT_TCP_IDLE_NS;
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

/// The bits a backend's packet adds: FIN/RST, and that it answered (a SYN-ACK; any UDP reply).
#[inline(always)]
pub fn backend_flags_of(pkt: &Packet) -> u32 {
    if pkt.proto != PROTO_TCP {
        return FLOW_F_SYNACK;
    }
    let mut f = flags_of(pkt, FLOW_F_FIN_BACKEND);
    if pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
        f |= FLOW_F_SYNACK;
    }
    f
}

/// The bits a client packet on a tracked flow adds: FIN/RST, and the confirmation when it
/// acknowledges (ACK without SYN) a SYN-ACK the backend sent. A spoofed SYN's sender never
/// sees the SYN-ACK, so it cannot time this ACK; conntrack's SYN_RECV → ESTABLISHED. A UDP
/// flow is confirmed by a client datagram after the backend's first answer (conntrack's
/// "assured": a spoofed source never sees the answer). Also moves the flow's `client_next`
/// on, and leaves out an RST the backend would ignore.
#[inline(always)]
pub fn client_flags_of(pkt: &Packet, st: &mut FlowState) -> u32 {
    if pkt.proto != PROTO_TCP {
        if st.flags & (FLOW_F_SYNACK | FLOW_F_CONFIRMED) == FLOW_F_SYNACK {
            return FLOW_F_CONFIRMED;
        }
        return 0;
    }
    let mut f = flags_of(pkt, FLOW_F_FIN_CLIENT);
    let offset = pkt.seq.wrapping_sub(st.client_next) as i32;
    if f & FLOW_F_RST != 0 {
        if offset.unsigned_abs() > RST_WINDOW {
            // Forwarded all the same (the backend decides), but it does not end the flow here.
            f &= !FLOW_F_RST;
            count(stat::RST_OUT_OF_WINDOW);
        }
    } else {
        // Moves on only for a segment that starts near the known point: a blind packet with
        // a chosen sequence number cannot drag the RST window to where its next RST lands.
        let end = pkt.seq.wrapping_add(pkt.seq_len);
        if offset.unsigned_abs() < ADVANCE_WINDOW && end.wrapping_sub(st.client_next) as i32 > 0 {
            st.client_next = end;
        }
    }
    if st.flags & (FLOW_F_SYNACK | FLOW_F_CONFIRMED) == FLOW_F_SYNACK
        && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_ACK
    {
        f |= FLOW_F_CONFIRMED;
    }
    f
}

/// A client SYN that opens a connection (not a SYN-ACK).
#[inline(always)]
pub fn is_syn(pkt: &Packet) -> bool {
    pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// What a lookup found; `confirmed` names the table (`FLOWS`, or else `FLOWS_NEW`).
pub enum Tracked {
    /// A live flow: keep following it.
    Live(*mut FlowState, bool),
    /// A flow that ended (closed, idle, or a SYN reusing the tuple), copied into `w.st`: a new
    /// one may replace it.
    Ended(bool),
    Unknown,
}

/// Looks `w.key` up and decides whether the flow is still live. An expired flow is counted by
/// why it expired. Confirmed flows come first: an established packet costs one lookup.
#[inline(always)]
pub fn lookup(w: &mut Work, now: u64) -> Tracked {
    if let Some(ptr) = FLOWS.get_ptr_mut(&w.key) {
        return classify(w, ptr, true, now);
    }
    if let Some(ptr) = FLOWS_NEW.get_ptr_mut(&w.key) {
        return classify(w, ptr, false, now);
    }
    Tracked::Unknown
}

/// Decides whether the flow at `ptr` (in `FLOWS` when `confirmed`) is still live.
#[inline(always)]
fn classify(w: &mut Work, ptr: *mut FlowState, confirmed: bool, now: u64) -> Tracked {
    // SAFETY: a valid map value; concurrent writers only set flag bits and timestamps.
    let (flags, last) = unsafe { ((*ptr).flags, (*ptr).last_seen_ns) };
    // A SYN on a closing TCP flow is the client reusing the tuple: a new connection.
    let reused = w.pkt.proto == PROTO_TCP
        && is_syn(&w.pkt)
        && flags & (FLOW_F_FIN_CLIENT | FLOW_F_FIN_BACKEND | FLOW_F_RST) != 0;
    if reused {
        // SAFETY: as above.
        mem::copy(&mut w.st, unsafe { &*ptr });
        return Tracked::Ended(confirmed);
    }
    let mut e = expiry(w.pkt.proto, flags, last, 0, now, &w.s);
    if let Expiry::Live = e {
        return Tracked::Live(ptr, confirmed);
    }
    // SAFETY: as above.
    mem::copy(&mut w.st, unsafe { &*ptr });
    if let Expiry::Idle = e
        && w.pkt.proto == PROTO_TCP
    {
        // Replies do not touch the flow entry (that would cost a lookup per reply); the NAT
        // entry keeps their time. Only a flow that looks idle pays for this lookup.
        e = expiry(w.pkt.proto, flags, last, nat_last_seen(w), now, &w.s);
        if let Expiry::Live = e {
            return Tracked::Live(ptr, confirmed);
        }
    }
    e.count();
    Tracked::Ended(confirmed)
}

/// The last reply time of the flow in `w.st` (0 when its NAT entry is gone or not its own).
#[inline(always)]
fn nat_last_seen(w: &mut Work) -> u64 {
    if !backend(w.st.backend_id, &mut w.be) {
        return 0;
    }
    nat_key_of_flow(w);
    // SAFETY: a valid map value; two fields are read.
    match unsafe { NAT.get(&w.nk) } {
        Some(ns) if mem::eq(&ns.flow, &w.key) => ns.last_seen_ns,
        _ => 0,
    }
}

/// Fills `w.nk` with the reverse key of the flow in `w.st` toward `w.be`.
#[inline(always)]
pub fn nat_key_of_flow(w: &mut Work) {
    mem::copy16(&mut w.nk.backend, &w.be.addr);
    mem::copy16(&mut w.nk.snat, &w.st.snat);
    w.nk.backend_port = w.be.port;
    w.nk.nat_port = w.st.nat_port;
    w.nk.proto = w.pkt.proto;
    w.nk.family = w.pkt.family;
    w.nk._pad = 0;
}

/// Whether a flow is still live, and if not, why it ended.
#[derive(Clone, Copy)]
pub enum Expiry {
    Live,
    /// TCP closed (RST, or FIN both ways) longer than the grace time.
    Closed,
    /// TCP never confirmed within `tcp_syn_ns`.
    Syn,
    /// No packet within `tcp_idle_ns` (confirmed TCP) or `udp_idle_ns`.
    Idle,
}

impl Expiry {
    /// Counts a timeout (a close is the flow's normal end, not counted here).
    #[inline(always)]
    pub fn count(self) {
        match self {
            Expiry::Syn => count(stat::EXPIRED_SYN),
            Expiry::Idle => count(stat::EXPIRED_IDLE),
            Expiry::Live | Expiry::Closed => {}
        }
    }
}

/// Whether a flow with these flags has ended: `last` is its own last-seen time, `nat_last`
/// its NAT entry's (replies), which counts only for a confirmed TCP flow's idle time.
#[inline(always)]
pub fn expiry(proto: u8, flags: u32, last: u64, nat_last: u64, now: u64, s: &Settings) -> Expiry {
    // `>=` throughout: with the coarse clock a zero timeout must still mean "at once".
    if proto != PROTO_TCP {
        return if now.saturating_sub(last) >= s.udp_idle_ns { Expiry::Idle } else { Expiry::Live };
    }
    let fins = FLOW_F_FIN_CLIENT | FLOW_F_FIN_BACKEND;
    if flags & FLOW_F_RST != 0 || flags & fins == fins {
        if now.saturating_sub(last) >= s.tcp_closed_ns {
            return Expiry::Closed;
        }
        return Expiry::Live;
    }
    if flags & FLOW_F_CONFIRMED == 0 {
        if now.saturating_sub(last) >= s.tcp_syn_ns {
            return Expiry::Syn;
        }
        return Expiry::Live;
    }
    let last = if nat_last > last { nat_last } else { last };
    if now.saturating_sub(last) >= s.tcp_idle_ns { Expiry::Idle } else { Expiry::Live }
}

/// Records a packet on a live flow: new flag bits, and the time (rate-limited). An unconfirmed
/// TCP flow keeps its time until a new bit (SYN-ACK, confirmation, close): retransmitted or
/// repeated SYNs do not extend its `tcp_syn_ns`; a UDP flow's time moves with every packet
/// (one-way streams never confirm). Racing updates from other CPUs are benign: bits only get
/// set, and any recent timestamp will do.
#[inline(always)]
pub fn touch(st: &mut FlowState, add_flags: u32, proto: u8, now: u64) {
    if add_flags & !st.flags != 0 {
        st.flags |= add_flags;
        st.last_seen_ns = now;
    } else if (st.flags & FLOW_F_CONFIRMED != 0 || proto != PROTO_TCP)
        && now.saturating_sub(st.last_seen_ns) > TOUCH_NS
    {
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
/// `w.st.hop` and `w.st.mtu`.
#[inline(always)]
pub fn route_to_backend(
    ctx: &XdpContext,
    w: &mut Work,
    from_client: bool,
    now: u64,
) -> Result<(), u32> {
    let src = if from_client { &w.pkt.src } else { &w.st.snat };
    w.st.mtu = fib::lookup(ctx, &w.pkt, src, &w.be.addr, &mut w.st.hop).map_err(|m| match m {
        FibMiss::NoNeigh => drop(stat::DROP_NO_NEIGH),
        FibMiss::Other => drop(stat::DROP_NO_ROUTE),
    })?;
    w.st.hop.at_ns = now;
    Ok(())
}

/// A new flow: pick the backend from the Maglev ring, route to it, take a SNAT address and a
/// free SNAT port ([`snat::alloc`]), and record both directions. Leaves `w.st` and `w.be` filled. Not
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
    // Route with the client as source first: it names the egress interface, whose SNAT
    // address (its pool's, or its own) becomes the source.
    route_to_backend(ctx, w, true, now)?;
    if vip.flags & VIP_F_DSR != 0 {
        return create_dsr(w, id, vip, now);
    }
    mem::copy16(&mut w.nk.backend, &w.be.addr);
    w.nk.backend_port = w.be.port;
    w.nk.proto = w.pkt.proto;
    w.nk.family = w.pkt.family;
    w.nk._pad = 0;
    new_nat_state(w, id, vip.service_id, now);
    // Every flow starts unconfirmed, in the tables of its own (TCP until the handshake
    // completes, UDP until the client speaks after an answer): a flood of either can only
    // evict other unconfirmed flows.
    snat::alloc(w)?;
    w.st.backend_id = id;
    w.st.generation = w.be.generation;
    w.st.nat_port = w.nk.nat_port;
    w.st.flags = flags_of(&w.pkt, FLOW_F_FIN_CLIENT);
    w.st.last_seen_ns = now;
    w.st.client_next = w.pkt.seq.wrapping_add(w.pkt.seq_len);
    w.st.encap_sport = 0;
    w.st._pad2 = 0;
    // The NAT entry was inserted first (it claims the port); nobody reclaims it before this
    // insert makes its flow visible (snat::SETUP_NS), so removing it on failure is safe.
    if FLOWS_NEW.insert(&w.key, &w.st, 0).is_err() {
        let _ = NAT_NEW.remove(&w.nk);
        return Err(drop(stat::DROP_MAP_FULL));
    }
    Ok(())
}

/// A new DSR flow (`w.be` chosen and routed): its outer source, and an unconfirmed entry for
/// a TCP SYN or a UDP datagram. Any other packet of a flow this node does not track (another
/// node may have started it, before ECMP moved it here) goes to the backend the ring says,
/// which is every node's answer for the same backend set, and is not tracked: a flood of
/// stray segments cannot fill the table. There is no reply path to confirm a flow on, so the
/// backend's answer is assumed (`FLOW_F_SYNACK`): the client's ACK (TCP) or next datagram
/// (UDP) confirms it. Not inlined, like `create`.
#[inline(never)]
fn create_dsr(w: &mut Work, id: u32, vip: &VipInfo, now: u64) -> Result<(), u32> {
    snat::encap_source(w)?;
    w.st.backend_id = id;
    w.st.generation = w.be.generation;
    w.st.nat_port = 0;
    let gue = if vip.flags & VIP_F_GUE != 0 { FLOW_F_GUE } else { 0 };
    w.st.flags = FLOW_F_DSR | gue | FLOW_F_SYNACK | flags_of(&w.pkt, FLOW_F_FIN_CLIENT);
    w.st.last_seen_ns = now;
    w.st.client_next = w.pkt.seq.wrapping_add(w.pkt.seq_len);
    w.st.encap_sport = encap::gue_sport(&w.pkt);
    w.st._pad2 = 0;
    if w.pkt.proto == PROTO_TCP && !is_syn(&w.pkt) {
        count(stat::DSR_UNTRACKED);
        return Ok(());
    }
    if FLOWS_NEW.insert(&w.key, &w.st, 0).is_err() {
        return Err(drop(stat::DROP_MAP_FULL));
    }
    Ok(())
}

/// Fills `w.ns` for the flow `w.key` to backend `backend_id`, reached through `w.st.hop`:
/// owned (no claim), seen `now`, no hop toward the client yet (the first reply looks it up).
#[inline(always)]
fn new_nat_state(w: &mut Work, backend_id: u32, service_id: u32, now: u64) {
    mem::copy(&mut w.ns.flow, &w.key);
    w.ns.backend_id = backend_id;
    w.ns.service_id = service_id;
    w.ns.hop.ifindex = 0;
    w.ns.hop.at_ns = 0;
    w.ns.last_seen_ns = now;
    w.ns.claim = 0;
    w.ns.backend_ifindex = w.st.hop.ifindex;
    w.ns.mtu = 0;
    w.ns._pad = 0;
}

/// Checks, once per next-hop refresh (every second of a flow's activity, and on its first
/// packet after a pause), that the flow's NAT entry is still its own, and records the current
/// interface toward the backend in it (replies are expected there). An LRU may have evicted
/// the entry: it is put back while the port is free; if another flow holds the port by now,
/// this flow is over, since its packets would join that flow's connection at the backend.
/// Not inlined: rare.
#[inline(never)]
pub fn check_nat(w: &mut Work, confirmed: bool, now: u64) -> Result<(), u32> {
    nat_key_of_flow(w);
    let (own, other) = if confirmed { (&NAT, &NAT_NEW) } else { (&NAT_NEW, &NAT) };
    if let Some(ns) = own.get_ptr_mut(&w.nk) {
        // SAFETY: a valid map value; only its owner's packets write this field.
        unsafe {
            if mem::eq(&(*ns).flow, &w.key) {
                (*ns).backend_ifindex = w.st.hop.ifindex;
                return Ok(());
            }
        }
        return Err(lost(w, confirmed));
    }
    // A port is in at most one of the two tables (snat.rs): checked before and after. Our own
    // entry there is a promotion in flight on another CPU.
    match holder(other, w) {
        Holder::Us => return Ok(()),
        Holder::Other => return Err(lost(w, confirmed)),
        Holder::Nobody => {}
    }
    new_nat_state(w, w.st.backend_id, w.be.service_id, now);
    if own.insert(&w.nk, &w.ns, snat::BPF_NOEXIST).is_err() {
        return Err(lost(w, confirmed));
    }
    match holder(other, w) {
        Holder::Nobody => {}
        Holder::Us => {
            let _ = own.remove(&w.nk);
            return Ok(());
        }
        Holder::Other => {
            let _ = own.remove(&w.nk);
            return Err(lost(w, confirmed));
        }
    }
    count(stat::NAT_RESTORED);
    Ok(())
}

enum Holder {
    Nobody,
    Us,
    Other,
}

/// Who holds `w.nk` in `table`: nobody, the flow `w.key`, or another flow.
#[inline(always)]
fn holder(table: &LruHashMap<NatKey, NatState>, w: &Work) -> Holder {
    // SAFETY: a valid map value; one field is compared.
    match unsafe { table.get(&w.nk) } {
        None => Holder::Nobody,
        Some(ns) if mem::eq(&ns.flow, &w.key) => Holder::Us,
        Some(_) => Holder::Other,
    }
}

/// Ends a flow whose SNAT port another flow holds now: its entry goes, the packet is dropped.
#[inline(always)]
fn lost(w: &Work, confirmed: bool) -> u32 {
    let _ = if confirmed { FLOWS.remove(&w.key) } else { FLOWS_NEW.remove(&w.key) };
    drop(stat::DROP_NAT_LOST)
}

/// Moves a flow the client just confirmed from the unconfirmed tables to the main ones: flow
/// entry first, then NAT entry, so that at every moment the port's NAT entry has its flow in
/// the table that goes with it (snat::holder_expiry relies on that). `w.st` holds the flow's
/// state with the confirmation, `w.be` its backend. Not inlined: once per connection.
#[inline(never)]
pub fn promote(w: &mut Work) -> Result<(), u32> {
    if w.st.flags & FLOW_F_DSR != 0 {
        // No NAT entry: the flow entry moves alone.
        if FLOWS.insert(&w.key, &w.st, 0).is_err() {
            return Err(drop(stat::DROP_MAP_FULL));
        }
        let _ = FLOWS_NEW.remove(&w.key);
        count(stat::FLOW_CONFIRMED);
        return Ok(());
    }
    nat_key_of_flow(w);
    // SAFETY: a valid map value, copied out.
    match unsafe { NAT_NEW.get(&w.nk) } {
        Some(ns) if mem::eq(&ns.flow, &w.key) => mem::copy(&mut w.ns, ns),
        _ => {
            // Its NAT entry was evicted by newer unconfirmed flows (and the port may be
            // another's now): replies could not be translated, so the flow cannot go on.
            let _ = FLOWS_NEW.remove(&w.key);
            return Err(drop(stat::DROP_UNCONFIRMED_LOST));
        }
    }
    w.ns.claim = 0;
    if FLOWS.insert(&w.key, &w.st, 0).is_err() {
        return Err(drop(stat::DROP_MAP_FULL));
    }
    if NAT.insert(&w.nk, &w.ns, snat::BPF_NOEXIST).is_err() {
        let _ = FLOWS.remove(&w.key);
        return Err(drop(stat::DROP_MAP_FULL));
    }
    let _ = NAT_NEW.remove(&w.nk);
    let _ = FLOWS_NEW.remove(&w.key);
    count(stat::FLOW_CONFIRMED);
    Ok(())
}
