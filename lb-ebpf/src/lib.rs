//! The XDP balancer: parse, classify, count. Stages are plain functions joined with `?`; an `Err`
//! carries the action to return, so every early exit states what happens to the packet.
#![no_std]

pub mod maps;
pub mod parse;

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{Counter, stat};

use crate::parse::{L3, parse};

/// Runs the balancer on one frame and returns the XDP action.
#[inline(always)]
pub fn balance(ctx: &XdpContext) -> u32 {
    maps::count(stat::RX);
    match try_balance(ctx) {
        Ok(action) | Err(action) => action,
    }
}

#[inline(always)]
fn try_balance(ctx: &XdpContext) -> Result<u32, u32> {
    let pkt = parse(ctx)?;
    let key = match pkt.l3 {
        L3::V4 { daddr, .. } => pkt.vip_key_v4(daddr),
        L3::V6 { daddr, .. } => pkt.vip_key_v6(daddr),
    };
    // SAFETY: the value is plain data and never kept past this packet.
    let Some(vip) = (unsafe { maps::VIPS.get(key) }) else {
        maps::count(stat::PASS_NOT_VIP);
        return Ok(xdp_action::XDP_PASS);
    };
    maps::count(stat::VIP_HIT);
    if let Some(c) = maps::SERVICE_STATS.get_ptr_mut(vip.service_id) {
        let len = (ctx.data_end() - ctx.data()) as u64;
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { add(c, len) };
    }
    Ok(xdp_action::XDP_PASS)
}

#[inline(always)]
unsafe fn add(c: *mut Counter, bytes: u64) {
    // SAFETY: the caller passes a valid per-CPU map slot.
    unsafe {
        (*c).packets += 1;
        (*c).bytes += bytes;
    }
}
