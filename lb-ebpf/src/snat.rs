//! SNAT allocation: which (SNAT address, port) toward a backend a new flow gets, and how a
//! finished flow's port is taken back. A port is in at most one of `NAT` (confirmed flows) and
//! `NAT_NEW` (unconfirmed TCP flows); only the flow that owns an entry, or the one CPU that wins
//! its `claim` word, ever changes it.
use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_get_prandom_u32, bpf_loop},
};
use lb_common::{FAMILY_V4, MAX_SNAT_ADDRS, NatState, SnatPool, hash::five_tuple_hash, stat};

use crate::{
    flow::{Expiry, drop, expiry},
    maps::{FLOWS, FLOWS_NEW, IFACES, NAT, NAT_NEW, PORT_CURSOR, SNAT_POOLS, count},
    mem,
    parse::zero16,
    scratch::Work,
};

pub const BPF_NOEXIST: u64 = 1;
/// Ports the cursor walks per new flow before giving up (each try is one atomic insert, plus
/// a few lookups when the port is held). A range this small is searched whole on every SYN; a
/// larger one is swept across SYNs, since the cursor moves on by exactly the ports tried.
const MAX_PORT_TRIES: u32 = 64;
/// A NAT entry whose flow is not in the flow table yet may be one a CPU has just inserted
/// (`flow::create` inserts the NAT entry first): it is not reclaimable for this long.
pub const SETUP_NS: u64 = 10_000_000;

/// Takes the new flow's SNAT address (into `w.st.snat` and `w.nk.snat`) and port (into
/// `w.nk.nat_port`) toward `w.be`, leaving its NAT entry `w.ns` inserted; `w.nk`'s other fields
/// are filled by the caller. The egress interface `w.st.hop.ifindex` names the addresses: its
/// `[[xdp.snat]]` pool for the packet's family, else its own address.
///
/// A pool's first choice is a fixed function of the client tuple (as the port's is, for the
/// same TIME_WAIT reason), which also spreads clients over the addresses; when that address
/// has no free or reclaimable port the next ones are searched in turn, so a backend takes
/// addresses × ports concurrent flows before a SYN is refused. Only new flows come here.
#[inline(always)]
pub fn alloc(w: &mut Work) -> Result<(), u32> {
    w.snat_n = 0;
    w.snat_first = 0;
    if let Some(pool) = SNAT_POOLS.get_ptr(w.st.hop.ifindex) {
        // SAFETY: a valid map value; the count is read once.
        let n =
            unsafe { if w.pkt.family == FAMILY_V4 { (*pool).v4_count } else { (*pool).v6_count } };
        if n != 0 {
            let n = if n > MAX_SNAT_ADDRS { MAX_SNAT_ADDRS } else { n };
            // Another hash than the port's preferred offset (a sum over the client address
            // and port): one value for both would tie the address to the port's parity.
            let p = &w.pkt;
            w.snat_first = five_tuple_hash(&p.src, &p.dst, p.sport, p.dport, p.proto) % n;
            w.snat_n = n;
        }
    }
    let tries = if w.snat_n == 0 {
        own_address(w)?;
        1
    } else {
        w.snat_n
    };
    let mut search = Search { w, found: 0 };
    // The address loop runs in bpf_loop (which the verifier inlines): its callback, holding
    // the port search, is verified apart from the paths that lead here. A plain loop around
    // the 64-try port search made the verifier walk MAX_SNAT_ADDRS × MAX_PORT_TRIES tries
    // and give up. What the callback needs is in `w` (per-CPU memory the verifier does not
    // track), so every path reaches it in the same state.
    // SAFETY: the callback takes the `Search` this frame passes, and returns 0 or 1.
    unsafe {
        bpf_loop(tries, try_address as *mut c_void, &mut search as *mut Search as *mut c_void, 0);
    }
    if search.found == 0 {
        return Err(drop(stat::DROP_NO_PORT));
    }
    Ok(())
}

/// The state of [`alloc`]'s address loop, on its stack (bpf_loop takes a stack pointer).
#[repr(C)]
struct Search {
    w: *mut Work,
    /// 1 once a try found a port. Only ever 0 or 1: a value that changed with the try (its
    /// number) would keep the verifier from seeing that one more iteration brings nothing
    /// new, and it would walk the callback once per possible value.
    found: u64,
}

/// One try of [`alloc`]'s address loop: address `snat_first + i` of the pool (or the own
/// address), then the port search on it. Returns 1 to stop the loop.
extern "C" fn try_address(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer `alloc` gave it; `w` is this packet's per-CPU
    // scratch, used by one program run at a time.
    let s = unsafe { &mut *(ctx as *mut Search) };
    let w = unsafe { &mut *s.w };
    // Read once: the helper call below could (for LLVM) change `w`, and a second read
    // would bring back a division-by-zero panic path the verifier refuses.
    let (n, first) = (w.snat_n, w.snat_first);
    if n != 0 {
        let Some(pool) = SNAT_POOLS.get_ptr(w.st.hop.ifindex) else { return 1 };
        let k = first.wrapping_add(i as u32) % n;
        if !pool_address(w, pool, k) {
            // A slot the daemon is rewriting (it reads as zero): the rest may be too.
            return 1;
        }
    }
    // Every new flow starts unconfirmed (flow::create): its port goes into NAT_NEW.
    if alloc_port(w, true) {
        if i != 0 {
            count(stat::SNAT_ADDR_NEXT);
        }
        s.found = 1;
        return 1;
    }
    0
}

/// The outer source of a DSR flow toward `w.be` (into `w.st.snat`): an address of its
/// egress interface's `[[xdp.snat]]` pool picked by flow hash, so the backend's NIC hashes
/// flows of one client over several queues (Katran varies the source for the same reason),
/// else the interface's own address. No port: nothing comes back.
#[inline(always)]
pub fn encap_source(w: &mut Work) -> Result<(), u32> {
    if let Some(pool) = SNAT_POOLS.get_ptr(w.st.hop.ifindex) {
        // SAFETY: a valid map value; the count is read once.
        let n =
            unsafe { if w.pkt.family == FAMILY_V4 { (*pool).v4_count } else { (*pool).v6_count } };
        let n = if n > MAX_SNAT_ADDRS { MAX_SNAT_ADDRS } else { n };
        if n != 0 {
            let p = &w.pkt;
            let k = five_tuple_hash(&p.src, &p.dst, p.sport, p.dport, p.proto) % n;
            if pool_address(w, pool, k) {
                return Ok(());
            }
        }
    }
    own_address(w)
}

/// Puts the egress interface's own address (the SNAT source without a pool) into `w.st.snat`
/// and `w.nk.snat`.
#[inline(always)]
fn own_address(w: &mut Work) -> Result<(), u32> {
    let addrs = IFACES.get_ptr(w.st.hop.ifindex).ok_or_else(|| drop(stat::DROP_NO_SNAT_ADDR))?;
    zero16(&mut w.st.snat);
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
    mem::copy16(&mut w.nk.snat, &w.st.snat);
    Ok(())
}

/// Copies address `k` of the packet's family from `pool` into `w.st.snat` and `w.nk.snat`;
/// false when the slot is out of range or zero.
#[inline(always)]
fn pool_address(w: &mut Work, pool: *const SnatPool, k: u32) -> bool {
    // LLVM knows `k < n <= MAX_SNAT_ADDRS` from the modulo and drops the bounds check below;
    // the verifier cannot follow a modulo. A volatile read hides that knowledge, so the
    // check stays where the verifier sees it.
    // SAFETY: reads a local.
    let k = unsafe { core::ptr::read_volatile(&k) };
    if k >= MAX_SNAT_ADDRS {
        return false;
    }
    zero16(&mut w.st.snat);
    // SAFETY: a valid map value; `get` keeps the index in bounds for the verifier too.
    let pool = unsafe { &*pool };
    if w.pkt.family == FAMILY_V4 {
        let Some(a) = pool.v4.get(k as usize) else { return false };
        w.st.snat[..4].copy_from_slice(a);
    } else {
        let Some(a) = pool.v6.get(k as usize) else { return false };
        mem::copy16(&mut w.st.snat, a);
    }
    mem::copy16(&mut w.nk.snat, &w.st.snat);
    w.st.snat != [0u8; 16]
}

/// Claims a SNAT port on address `w.nk.snat` for `w.nk` (in `NAT_NEW` when `fresh`, else
/// `NAT`) with an atomic insert-if-absent, so two CPUs never share one; false when every
/// port tried is held by a live flow.
///
/// The first choice is a fixed function of the client's address and port. Backends keep
/// closed connections in TIME_WAIT for 60 s and accept a new SYN on the same 4-tuple only if
/// its TCP timestamp is newer; timestamps are consistent per client 4-tuple, so mapping the same
/// client tuple to the same SNAT port keeps reuse acceptable, where a port handed to a
/// *different* client tuple would be refused now and then (a 1 s stall for that client). The
/// fallbacks walk a per-CPU cursor (randomly seeded) one port at a time: the first free port
/// wins; failing that, the first port of a finished flow seen on the way is reclaimed (free
/// ports first, because the backend may keep a reclaimed port's old 4-tuple in TIME_WAIT).
#[inline(always)]
fn alloc_port(w: &mut Work, fresh: bool) -> bool {
    let range = (w.s.nat_port_max as u32).saturating_sub(w.s.nat_port_min as u32) + 1;
    let preferred = lb_common::hash::source_hash(&w.pkt.src)
        .wrapping_add(u16::from_be(w.pkt.sport) as u32)
        % range;
    match probe(w, preferred, false, fresh) {
        Probe::Won => return true,
        Probe::Held if reclaim(w, preferred, false, fresh) => return true,
        _ => {}
    }
    let Some(cursor) = PORT_CURSOR.get_ptr_mut(0) else { return false };
    // SAFETY: per-CPU slot; only this CPU touches it while this program runs.
    unsafe {
        if *cursor == 0 {
            // A fresh table starts at a random point, not where a previous instance started:
            // backends may still hold those ports in TIME_WAIT.
            *cursor = bpf_get_prandom_u32() | 1;
        }
    }
    let tries = if range < MAX_PORT_TRIES { range } else { MAX_PORT_TRIES };
    let mut walk = Walk { w, fallback: u32::MAX, won: 0 };
    // In bpf_loop for the verifier's sake, as the address loop in `alloc`: the body is
    // verified a few times, not once per try.
    // SAFETY: the callback takes the `Walk` this frame passes, and returns 0 or 1.
    unsafe {
        bpf_loop(tries, try_port as *mut c_void, &mut walk as *mut Walk as *mut c_void, 0);
    }
    if walk.won != 0 {
        return true;
    }
    walk.fallback != u32::MAX && reclaim(w, walk.fallback, true, fresh)
}

/// The state of [`alloc_port`]'s walk, on its stack (bpf_loop takes a stack pointer).
#[repr(C)]
struct Walk {
    w: *mut Work,
    /// The first port of a finished flow seen on the way, or `u32::MAX`.
    fallback: u32,
    /// 1 once a free port was taken.
    won: u32,
}

/// One step of [`alloc_port`]'s walk: the next port under this CPU's cursor. Returns 1 to
/// stop the walk.
extern "C" fn try_port(_i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer `alloc_port` gave it; `w` is this packet's
    // per-CPU scratch, used by one program run at a time.
    let s = unsafe { &mut *(ctx as *mut Walk) };
    let w = unsafe { &mut *s.w };
    let Some(cursor) = PORT_CURSOR.get_ptr_mut(0) else { return 1 };
    // SAFETY: per-CPU slot; only this CPU touches it while this program runs.
    let c = unsafe {
        let c = *cursor;
        *cursor = c.wrapping_add(1);
        c
    };
    let range = (w.s.nat_port_max as u32).saturating_sub(w.s.nat_port_min as u32) + 1;
    let offset = c % range;
    // As in try_address: a new flow's port goes into NAT_NEW.
    match probe(w, offset, s.fallback == u32::MAX, true) {
        Probe::Won => {
            s.won = 1;
            return 1;
        }
        Probe::Dead => s.fallback = offset,
        Probe::Held => {}
    }
    0
}

/// What [`probe`] found at a port.
enum Probe {
    /// The port was free and is now this flow's.
    Won,
    /// Held by a finished flow: [`reclaim`] may take it.
    Dead,
    /// Held (by a live flow, or not checked).
    Held,
}

#[inline(always)]
fn set_port(w: &mut Work, offset: u32) {
    w.nk.nat_port = ((w.s.nat_port_min as u32 + offset) as u16).to_be();
}

/// Inserts `w.ns` under `w.nk` into the table for `fresh` if the key is in neither table.
/// The other table is checked after the insert: a promotion (`flow::promote`) inserts into
/// `NAT` before it removes from `NAT_NEW`, so a port moving between the tables is seen in one
/// of them at every step, and an insert that raced with it is taken back. A new entry in
/// `NAT_NEW` may briefly shadow nothing (replies try `NAT` first), so that path skips the
/// check before; one in `NAT` would briefly shadow a `NAT_NEW` owner's replies, so that one
/// looks first.
#[inline(always)]
fn take_free(w: &mut Work, fresh: bool) -> bool {
    if fresh {
        if NAT_NEW.insert(&w.nk, &w.ns, BPF_NOEXIST).is_err() {
            return false;
        }
        if NAT.get_ptr(&w.nk).is_some() {
            let _ = NAT_NEW.remove(&w.nk);
            return false;
        }
    } else {
        if NAT_NEW.get_ptr(&w.nk).is_some() || NAT.insert(&w.nk, &w.ns, BPF_NOEXIST).is_err() {
            return false;
        }
        if NAT_NEW.get_ptr(&w.nk).is_some() {
            let _ = NAT.remove(&w.nk);
            return false;
        }
    }
    true
}

/// The entry holding `w.nk`, and whether it is in `NAT` (else `NAT_NEW`).
#[inline(always)]
fn holder(w: &Work) -> Option<(*mut NatState, bool)> {
    if let Some(h) = NAT.get_ptr_mut(&w.nk) {
        return Some((h, true));
    }
    NAT_NEW.get_ptr_mut(&w.nk).map(|h| (h, false))
}

/// Tries to take SNAT port `nat_port_min + offset` if it is free; with `check`, also says
/// whether the flow holding it has ended (any client's).
#[inline(always)]
fn probe(w: &mut Work, offset: u32, check: bool, fresh: bool) -> Probe {
    set_port(w, offset);
    if take_free(w, fresh) {
        return Probe::Won;
    }
    if !check {
        return Probe::Held;
    }
    match holder(w) {
        Some((h, confirmed)) => match holder_expiry(w, h, true, confirmed) {
            Expiry::Live => Probe::Held,
            _ => Probe::Dead,
        },
        // Removed since the insert failed: free again.
        None if take_free(w, fresh) => Probe::Won,
        None => Probe::Held,
    }
}

/// Takes SNAT port `nat_port_min + offset` from a finished flow (this client tuple's previous
/// one, or any client's with `any_holder`). The reclaimer first wins the entry's `claim` word
/// by compare-and-swap, then overwrites it in one update (or, when the port moves between
/// tables, inserts the new entry before removing the claimed one), so the key is never absent
/// for a third CPU to grab. A CPU that looked at the entry earlier sees the claim taken, or
/// the new, live owner.
#[inline(always)]
fn reclaim(w: &mut Work, offset: u32, any_holder: bool, fresh: bool) -> bool {
    set_port(w, offset);
    let Some((h, confirmed)) = holder(w) else {
        return take_free(w, fresh);
    };
    let e = holder_expiry(w, h, any_holder, confirmed);
    if let Expiry::Live = e {
        return false;
    }
    // SAFETY: `claim` is a field of a live map value (RCU keeps the element's memory valid
    // for this program run even if it is replaced meanwhile).
    if !mem::claim(unsafe { &mut (*h).claim }) {
        return false;
    }
    // Any flag in the same table: if LRU pressure evicted the claimed entry meanwhile, the
    // key is free anyway.
    let ok = match (confirmed, fresh) {
        (true, false) => NAT.insert(&w.nk, &w.ns, 0).is_ok(),
        (false, true) => NAT_NEW.insert(&w.nk, &w.ns, 0).is_ok(),
        (true, true) => {
            NAT_NEW.insert(&w.nk, &w.ns, BPF_NOEXIST).is_ok() && NAT.remove(&w.nk).is_ok()
        }
        (false, false) => {
            NAT.insert(&w.nk, &w.ns, BPF_NOEXIST).is_ok() && NAT_NEW.remove(&w.nk).is_ok()
        }
    };
    if !ok {
        return false;
    }
    count(stat::PORT_RECLAIMED);
    e.count();
    true
}

/// Whether the flow holding the NAT entry `holder` (in `NAT` when `confirmed`) has ended. This
/// client tuple's own entry is always over (a new flow is being created for the tuple, so
/// lookup found the old one ended); another tuple's counts only with `any_holder`. Without
/// this, ports of finished flows would stay taken until LRU eviction.
#[inline(always)]
fn holder_expiry(w: &Work, holder: *mut NatState, any_holder: bool, confirmed: bool) -> Expiry {
    // SAFETY: a valid map value; its flow key and times are read.
    let holder = unsafe { &*holder };
    if mem::eq(&holder.flow, &w.key) {
        return Expiry::Closed;
    }
    if !any_holder {
        return Expiry::Live;
    }
    // A NAT entry's flow is in the table that goes with it (flow::promote keeps that true).
    let st = if confirmed { FLOWS.get_ptr(&holder.flow) } else { FLOWS_NEW.get_ptr(&holder.flow) };
    let Some(st) = st else {
        if w.now.saturating_sub(holder.last_seen_ns) < SETUP_NS {
            return Expiry::Live;
        }
        return Expiry::Closed;
    };
    // SAFETY: a valid map value; four fields are read.
    let (flags, last, port) = unsafe { ((*st).flags, (*st).last_seen_ns, (*st).nat_port) };
    // SAFETY: as above.
    if port != w.nk.nat_port || !mem::eq(unsafe { &(*st).snat }, &w.nk.snat) {
        // The tuple's flow now is a later one on another port or SNAT address: this entry
        // is an orphan.
        return Expiry::Closed;
    }
    expiry(holder.flow.proto, flags, last, holder.last_seen_ns, w.now, &w.s)
}
