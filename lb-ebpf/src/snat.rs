//! SNAT port allocation: which (SNAT address, port) toward a backend a new flow gets, and how a
//! finished flow's port is taken back. A port is in at most one of `NAT` (confirmed flows) and
//! `NAT_NEW` (unconfirmed TCP flows); only the flow that owns an entry, or the one CPU that wins
//! its `claim` word, ever changes it.
use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{NatState, stat};

use crate::{
    flow::{Expiry, drop, expiry},
    maps::{FLOWS, FLOWS_NEW, NAT, NAT_NEW, PORT_CURSOR, count},
    mem,
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

/// Claims a SNAT port for `w.nk` (in `NAT_NEW` when `fresh`, else `NAT`) with an atomic
/// insert-if-absent, so two CPUs never share one.
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
pub fn alloc_port(w: &mut Work, fresh: bool) -> Result<(), u32> {
    let range = (w.s.nat_port_max as u32).saturating_sub(w.s.nat_port_min as u32) + 1;
    let preferred = lb_common::hash::source_hash(&w.pkt.src)
        .wrapping_add(u16::from_be(w.pkt.sport) as u32)
        % range;
    match probe(w, preferred, false, fresh) {
        Probe::Won => return Ok(()),
        Probe::Held if reclaim(w, preferred, false, fresh) => return Ok(()),
        _ => {}
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
    let tries = if range < MAX_PORT_TRIES { range } else { MAX_PORT_TRIES };
    let mut fallback = u32::MAX;
    for i in 0..MAX_PORT_TRIES {
        if i >= tries {
            break;
        }
        // SAFETY: per-CPU slot; only this CPU touches it while this program runs.
        let c = unsafe {
            let c = *cursor;
            *cursor = c.wrapping_add(1);
            c
        };
        let offset = c % range;
        match probe(w, offset, fallback == u32::MAX, fresh) {
            Probe::Won => return Ok(()),
            Probe::Dead => fallback = offset,
            Probe::Held => {}
        }
    }
    if fallback != u32::MAX && reclaim(w, fallback, true, fresh) {
        return Ok(());
    }
    Err(drop(stat::DROP_NO_PORT))
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
    // SAFETY: a valid map value; three fields are read.
    let (flags, last, port) = unsafe { ((*st).flags, (*st).last_seen_ns, (*st).nat_port) };
    if port != w.nk.nat_port {
        // The tuple's flow now is a later one on another port: this entry is an orphan.
        return Expiry::Closed;
    }
    expiry(holder.flow.proto, flags, last, holder.last_seen_ns, w.now, &w.s)
}
