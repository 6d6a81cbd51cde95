//! Per-CPU counters: no atomics and no contention on the hot path.

use fulgur_common::{Counter, TrafficStats};

use crate::maps::{BACKEND_STATS, COUNTERS, SERVICE_STATS};

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn update(stats: Option<*mut TrafficStats>, f: impl FnOnce(&mut TrafficStats)) {
    if let Some(stats) = stats {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        f(unsafe { &mut *stats });
    }
}

/// A packet translated towards a backend.
#[inline(always)]
pub fn forwarded(service_id: u32, backend_id: u32, bytes: u64) {
    update(SERVICE_STATS.get_ptr_mut(service_id), |s| {
        s.packets += 1;
        s.bytes += bytes;
    });
    update(BACKEND_STATS.get_ptr_mut(backend_id), |s| {
        s.packets += 1;
        s.bytes += bytes;
    });
}

#[inline(always)]
pub fn new_flow(service_id: u32, backend_id: u32) {
    update(SERVICE_STATS.get_ptr_mut(service_id), |s| s.new_flows += 1);
    update(BACKEND_STATS.get_ptr_mut(backend_id), |s| s.new_flows += 1);
}

#[inline(always)]
pub fn rejected(service_id: u32) {
    update(SERVICE_STATS.get_ptr_mut(service_id), |s| s.rejects += 1);
}
