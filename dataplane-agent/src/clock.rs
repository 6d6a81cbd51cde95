//! CLOCK_MONOTONIC, the clock the programs read (`bpf_ktime_get_ns`) or are given: it counts
//! from boot, so it survives an agent restart.

use std::time::Duration;

pub fn monotonic() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into `now`, which we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}
