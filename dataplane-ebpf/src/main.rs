//! fulgur's dataplane: XDP ingress (service lookup, backend selection, DNAT, forwarding) and TC
//! egress (reverse NAT of backend replies).
#![no_std]
#![no_main]

mod announce;
mod egress;
mod forward;
mod icmp;
mod ingress;
mod log;
mod maps;
mod nat;
mod parse;
mod reject;
mod select;
mod snat;
mod stats;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

/// Client-facing ingress: translate and forward packets addressed to a service.
#[xdp]
pub fn fulgur_xdp_ingress(ctx: XdpContext) -> u32 {
    ingress::handle(&ctx)
}

/// Client-facing egress: translate backend replies back to the service address.
#[classifier]
pub fn fulgur_tc_egress(ctx: TcContext) -> i32 {
    egress::handle(&ctx)
}

/// Passes everything. Native XDP on veth delivers redirected frames only to a peer that has an
/// XDP program, and the benchmark uses it as the fixed per-call floor.
#[xdp]
pub fn fulgur_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

// Only for BPF: a host `cargo clippy --workspace` unifies features and links std.
#[cfg(all(not(test), target_arch = "bpf"))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
