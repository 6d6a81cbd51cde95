//! `--bpf-log`: the eBPF programs' own diagnostics for the rare outcomes — a failed redirect and
//! a full conntrack at `warn`, a rejection and a malformed packet at `debug` — read from their
//! ring buffer ([`LogRecord`]s) and emitted through `tracing` (target `fulgur::bpf`), rate
//! limited by a token bucket ([`RECORDS_PER_SECOND`], [`BURST`]).
//!
//! The level is a load-time constant in the programs' `.rodata`: the verifier removes the calls
//! it disables, so `off` (the default) costs nothing, and no reader runs. Changing the level is
//! a program reload, which the pinned maps and links survive (see [`crate::dataplane`]).

use std::{
    net::IpAddr,
    os::fd::{AsRawFd, RawFd},
    sync::Arc,
    time::Instant,
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
};
use fulgur_common::{Addr, Counter, FAMILY_IPV4, FAMILY_IPV6, LOG_MAP, LogRecord, log_levels};
use tokio::io::{Interest, unix::AsyncFd};

use crate::metrics::Metrics;

/// Records emitted per second at most; more are read, counted as dropped, and not emitted.
pub const RECORDS_PER_SECOND: f64 = 100.0;
/// Records emitted in a burst at most (the token bucket's size).
pub const BURST: f64 = 100.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BpfLog {
    Off,
    Warn,
    Debug,
}

impl BpfLog {
    /// The value for the programs' log-level global: records above it are not written.
    pub fn level(self) -> u8 {
        match self {
            BpfLog::Off => log_levels::OFF,
            BpfLog::Warn => log_levels::WARN,
            BpfLog::Debug => log_levels::DEBUG,
        }
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: f64, burst: f64) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Reads [`LogRecord`]s from the programs' ring and emits them as `tracing` events.
pub struct Reader {
    ring: RingBuf<MapData>,
    bucket: TokenBucket,
    metrics: Arc<Metrics>,
}

fn reason_name(reason: u32) -> &'static str {
    match reason {
        r if r == Counter::RedirectFailed as u32 => "redirect_failed",
        r if r == Counter::ConntrackFull as u32 => "conntrack_full",
        r if r == Counter::RejectTcpReset as u32 => "rejected_tcp_reset",
        r if r == Counter::RejectIcmpUnreachable as u32 => "rejected_icmp_unreachable",
        r if r == Counter::PassMalformed as u32 => "malformed",
        _ => "unknown",
    }
}

fn ip(family: u8, addr: &Addr) -> Option<IpAddr> {
    let bytes: Vec<u8> = addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
    match family {
        FAMILY_IPV4 => Some(IpAddr::from(<[u8; 4]>::try_from(&bytes[..4]).ok()?)),
        FAMILY_IPV6 => Some(IpAddr::from(<[u8; 16]>::try_from(&bytes[..]).ok()?)),
        _ => None,
    }
}

/// One record as a `tracing` event (target `fulgur::bpf`), fields named as in the record.
fn emit(record: &LogRecord) {
    let reason = reason_name(record.reason);
    let src = ip(record.family, &record.src).map(|a| a.to_string());
    let dst = ip(record.family, &record.dst).map(|a| a.to_string());
    let (src, dst) = (src.as_deref().unwrap_or("-"), dst.as_deref().unwrap_or("-"));
    let (sport, dport) = (u16::from_be(record.src_port), u16::from_be(record.dst_port));
    let proto = record.proto;
    match (record.reason, record.level) {
        (r, _) if r == Counter::RedirectFailed as u32 => tracing::warn!(
            target: "fulgur::bpf", %reason, %src, %dst, proto, sport, dport, ifindex = record.value,
            "eBPF: redirect failed"
        ),
        (r, _) if r == Counter::PassMalformed as u32 => tracing::info!(
            target: "fulgur::bpf", %reason, %src, %dst, proto, len = record.value,
            "eBPF: malformed packet"
        ),
        (_, log_levels::WARN) => tracing::warn!(
            target: "fulgur::bpf", %reason, %src, %dst, proto, sport, dport, value = record.value,
            "eBPF"
        ),
        // Debug records show at the agent's default (info) filter: --bpf-log chose the level.
        _ => tracing::info!(
            target: "fulgur::bpf", %reason, %src, %dst, proto, sport, dport, value = record.value,
            "eBPF"
        ),
    }
}

impl Reader {
    /// Emits what the ring holds, within the rate limit; counts the rest as dropped.
    fn drain(&mut self) {
        while let Some(item) = self.ring.next() {
            if item.len() < size_of::<LogRecord>() {
                continue;
            }
            // SAFETY: the programs write whole LogRecords; read_unaligned needs no alignment.
            let record: LogRecord = unsafe { item.as_ptr().cast::<LogRecord>().read_unaligned() };
            drop(item);
            if self.bucket.take(Instant::now()) {
                self.metrics.bpf_log_record("emitted");
                emit(&record);
            } else {
                self.metrics.bpf_log_record("dropped");
            }
        }
    }
}

impl AsRawFd for Reader {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

/// Takes the log ring out of a dataplane loaded with `bpf_log` on; `None` when it is off.
pub fn reader(
    ebpf: &mut Ebpf,
    bpf_log: BpfLog,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Option<Reader>> {
    if bpf_log == BpfLog::Off {
        return Ok(None);
    }
    let map = ebpf
        .take_map(LOG_MAP)
        .with_context(|| format!("no map {LOG_MAP}"))?;
    Ok(Some(Reader {
        ring: RingBuf::try_from(map)?,
        bucket: TokenBucket::new(RECORDS_PER_SECOND, BURST),
        metrics,
    }))
}

/// Emits records as the ring fills; runs until the runtime stops.
pub async fn run(reader: Reader) -> std::io::Result<()> {
    // SAFETY: the reader owns the ring buffer's fd, which stays open and the same until the
    // AsyncFd (which owns the reader) is dropped.
    let mut ring = unsafe { AsyncFd::register_with_interest(reader, Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    loop {
        let mut ready = ring.readable_mut().await?;
        ready.get_inner_mut().drain();
        ready.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 3.0);
        bucket.last = start;
        assert_eq!((0..5).filter(|_| bucket.take(start)).count(), 3);
        // A tenth of a second buys one more at 10/s.
        assert!(bucket.take(start + Duration::from_millis(100)));
        assert!(!bucket.take(start + Duration::from_millis(100)));
    }

    #[test]
    fn off_disables_every_level() {
        assert_eq!(BpfLog::Off.level(), 0);
        assert!(BpfLog::Warn.level() < BpfLog::Debug.level());
        assert_eq!(BpfLog::Debug.level(), log_levels::DEBUG);
    }
}
