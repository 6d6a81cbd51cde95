//! Kernel-side diagnostics (`--bpf-log`) for the rare outcomes: a failed redirect, a full
//! conntrack, a rejection, a malformed packet. Never called on the established-flow path.
//!
//! Each call is gated on [`FULGUR_LOG_LEVEL`], a `.rodata` global the agent sets at load. The
//! loader freezes `.rodata`, so the verifier knows the level and removes the disabled calls: at
//! `off` the loaded program holds no log code. Records are fixed-size [`LogRecord`]s written
//! straight into the ring (aya-log-ebpf's macros need ~260 bytes of stack per call, more than
//! the ingress program has left under the 512-byte limit).

use aya_ebpf::{Global, macros::map, maps::RingBuf, programs::XdpContext};
use fulgur_common::{
    Addr, Counter, FAMILY_IPV4, FAMILY_IPV6, FlowKey, LogRecord,
    log_levels::{DEBUG, WARN},
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    forward::Route,
    parse::{self, ETH_P_IPV4, ETH_P_IPV6, Ip},
};

#[map]
static FULGUR_LOG: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

/// The log level; the agent overrides it at load (0: off).
#[unsafe(no_mangle)]
static FULGUR_LOG_LEVEL: Global<u8> = Global::new(0);

#[inline(always)]
fn enabled(level: u8) -> bool {
    level <= FULGUR_LOG_LEVEL.load()
}

/// Writes one record, `$fill(record, $args...)` filling it in place in the ring: built on the
/// stack first, it would take 48 of the ingress program's last bytes (and a closure, which
/// LLVM may leave uninlined, a BPF call frame). A full ring loses it (the reader counts what
/// it reads).
macro_rules! emit {
    ($fill:ident($($arg:expr),*)) => {
        if let Some(mut entry) = FULGUR_LOG.reserve::<LogRecord>(0) {
            $fill(entry.write(LogRecord::default()), $($arg),*);
            entry.submit(0);
        }
    };
}

#[inline(always)]
fn flow_record(record: &mut LogRecord, level: u8, reason: Counter, flow: &FlowKey, value: u32) {
    record.reason = reason as u32;
    record.level = level;
    record.family = flow.family;
    record.proto = flow.proto;
    record.src_port = flow.src_port;
    record.dst_port = flow.dst_port;
    record.src = flow.src;
    record.dst = flow.dst;
    record.value = value;
}

/// (family, source, destination) of a bounds-checked IP header.
#[inline(always)]
fn ip_addrs(ip: Ip) -> (u8, Addr, Addr) {
    // SAFETY: the header was bounds checked by the parser.
    unsafe {
        match ip {
            Ip::V4(h) => (
                FAMILY_IPV4,
                fulgur_common::addr_v4((*h).src_addr),
                fulgur_common::addr_v4((*h).dst_addr),
            ),
            Ip::V6(h) => (
                FAMILY_IPV6,
                fulgur_common::addr_v6((*h).src_addr),
                fulgur_common::addr_v6((*h).dst_addr),
            ),
        }
    }
}

/// `bpf_redirect_map` refused the device the FIB chose; the packet went to the kernel untouched.
#[inline(always)]
pub fn redirect_failed(route: &Route, ifindex: u32) {
    if enabled(WARN) {
        emit!(route_record(route, ifindex));
    }
}

#[inline(always)]
fn route_record(record: &mut LogRecord, route: &Route, ifindex: u32) {
    (record.family, record.src, record.dst) = ip_addrs(route.ip);
    record.reason = Counter::RedirectFailed as u32;
    record.level = WARN;
    record.proto = route.proto;
    (record.src_port, record.dst_port) = route.ports;
    record.value = ifindex;
}

/// A new flow could not be remembered: it is forwarded, but its next packets may pick again.
#[inline(always)]
pub fn conntrack_full(flow: &FlowKey) {
    if enabled(WARN) {
        emit!(flow_record(WARN, Counter::ConntrackFull, flow, 0));
    }
}

/// The service has no backend: the client gets a TCP reset or an ICMP port unreachable.
#[inline(always)]
pub fn rejected(flow: &FlowKey, service_id: u32) {
    if enabled(DEBUG) {
        let reason = if flow.proto == fulgur_common::PROTO_TCP {
            Counter::RejectTcpReset
        } else {
            Counter::RejectIcmpUnreachable
        };
        emit!(flow_record(DEBUG, reason, flow, service_id));
    }
}

/// The headers did not parse; names the addresses when the IP header itself is whole.
#[inline(always)]
pub fn malformed(ctx: &XdpContext) {
    if enabled(DEBUG) {
        emit!(malformed_record(ctx));
    }
}

#[inline(always)]
fn malformed_record(record: &mut LogRecord, ctx: &XdpContext) {
    record.reason = Counter::PassMalformed as u32;
    record.level = DEBUG;
    record.value = (ctx.data_end() - ctx.data()) as u32;
    if let Ok(frame) = parse::ethernet(ctx) {
        if frame.ether_type == ETH_P_IPV4
            && let Some(h) = parse::ptr_at::<Ipv4Hdr>(ctx, frame.l3)
        {
            (record.family, record.src, record.dst) = ip_addrs(Ip::V4(h));
            // SAFETY: bounds checked by ptr_at.
            record.proto = unsafe { (*h).proto };
        } else if frame.ether_type == ETH_P_IPV6
            && let Some(h) = parse::ptr_at::<Ipv6Hdr>(ctx, frame.l3)
        {
            (record.family, record.src, record.dst) = ip_addrs(Ip::V6(h));
            // SAFETY: bounds checked by ptr_at.
            record.proto = unsafe { (*h).next_hdr };
        }
    }
}
