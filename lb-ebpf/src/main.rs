//! The XDP entry points of lb. The balancer logic lives in the library half of this crate.
#![no_std]
#![no_main]

use aya_ebpf::{macros::xdp, programs::XdpContext};

/// The balancer: attached to every interface where client packets or backend replies arrive.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    lb_ebpf::balance(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
