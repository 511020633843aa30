//! The clock that times synchronous subscriptions' callbacks for the statistics
//! (`callback_max_ns`): the CPU's time-stamp counter where the kernel itself keeps time
//! with it, else `Instant`. (Queued kinds time theirs with `instant_ns`, see
//! `Subscription::stats_clock`.)
//!
//! Every callback is timed, on the thread that runs it: a synchronous subscription's
//! on the publisher's. `Instant::now()` is a vDSO `clock_gettime`, whose ordered counter
//! read waits for the loads still in flight (25 ns and more in a publish loop; two per
//! synchronous delivery, a caching topic's update among them). A plain `rdtsc` does not
//! wait, and a duration needs no ordering finer than a few dozen cycles. The counter is
//! used only when the kernel's clocksource is "tsc": then the kernel has checked that it
//! runs at a constant rate and agrees across CPUs (otherwise it would have switched
//! clocksources), so a callback that starts on one CPU and ends on another is timed
//! right. The choice is made once: should the kernel later find the counter unstable
//! and switch clocksources, only these statistics would be off. Elsewhere (other
//! clocksources, other architectures, loom) ticks are nanoseconds from `Instant`.
//!
//! Ticks become nanoseconds only when the statistics are read (`to_ns`), at the rate
//! measured between the first tick and that moment against `Instant`; the rate is kept
//! once measured over long enough for an error below a thousandth.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where ticks come from, decided once.
struct Origin {
    /// Ticks read the time-stamp counter.
    tsc: bool,
    /// The first tick and the `Instant` beside it: the rate's base, and the fallback's
    /// zero.
    ticks0: u64,
    instant0: Instant,
}

static ORIGIN: OnceLock<Origin> = OnceLock::new();

/// Nanoseconds per tick in 32.32 fixed point, once measured over `SETTLE_NS`; 0 before.
static RATE: AtomicU64 = AtomicU64::new(0);

/// How long the rate is measured over before it is kept, and how far apart the reads
/// around each end's counter read may be (`paired_reads`): the rate's error stays below
/// 2 x 5 us / 10 ms = 1e-3. A wider pair (a preempted read) still converts, unkept.
const SETTLE_NS: u128 = 10_000_000;
const MAX_PAIR_WIDTH_NS: u128 = 5_000;

/// Decides the clock (reads one sysfs file the first time). Called when a subscription
/// is made, so no callback pays for the decision.
pub(crate) fn init() {
    origin();
}

fn origin() -> &'static Origin {
    ORIGIN.get_or_init(|| {
        let tsc = kernel_uses_tsc();
        let (ticks0, instant0, _) = if tsc {
            paired_reads()
        } else {
            (0, Instant::now(), Duration::ZERO)
        };
        Origin {
            tsc,
            ticks0,
            instant0,
        }
    })
}

/// A counter read and the `Instant` of the same moment: the midpoint of two reads around
/// it, and how far apart those were (the pair's uncertainty). Both clocks are read once
/// before, so the first read of either (a page fault, a binary translator's first pass)
/// does not widen the bracket.
fn paired_reads() -> (u64, Instant, Duration) {
    let _ = (read_tsc(), Instant::now());
    let before = Instant::now();
    let ticks = read_tsc();
    let after = Instant::now();
    let width = after.duration_since(before);
    (ticks, before + width / 2, width)
}

#[cfg(all(target_arch = "x86_64", not(loom)))]
fn kernel_uses_tsc() -> bool {
    std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
        .is_ok_and(|s| s.trim() == "tsc")
}

#[cfg(not(all(target_arch = "x86_64", not(loom))))]
fn kernel_uses_tsc() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn read_tsc() -> u64 {
    // SAFETY: rdtsc reads a register; every x86_64 CPU has it, and user mode may run it
    // (Linux does not set CR4.TSD).
    unsafe { std::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline]
fn read_tsc() -> u64 {
    0
}

/// The time now, in ticks.
#[inline]
pub(crate) fn now() -> u64 {
    let o = origin();
    if o.tsc {
        read_tsc()
    } else {
        nanos_since(o.instant0)
    }
}

/// The time now in nanoseconds from `Instant` (the vDSO clock), whatever `now` reads.
#[inline]
pub(crate) fn instant_ns() -> u64 {
    nanos_since(origin().instant0)
}

fn nanos_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A duration in ticks, in nanoseconds.
pub(crate) fn to_ns(ticks: u64) -> u64 {
    let o = origin();
    if !o.tsc {
        return ticks;
    }
    let rate = match RATE.load(Ordering::Relaxed) {
        0 => {
            let (now_ticks, now_instant, width) = paired_reads();
            let elapsed_ns = now_instant.duration_since(o.instant0).as_nanos();
            let elapsed_ticks = now_ticks.wrapping_sub(o.ticks0);
            let Some(rate) = rate_of(elapsed_ns, elapsed_ticks) else {
                return ticks;
            };
            if elapsed_ns >= SETTLE_NS && width.as_nanos() <= MAX_PAIR_WIDTH_NS {
                RATE.store(rate, Ordering::Relaxed);
            }
            rate
        }
        rate => rate,
    };
    scale(ticks, rate)
}

/// Nanoseconds per tick in 32.32 fixed point; None when no tick passed.
fn rate_of(elapsed_ns: u128, elapsed_ticks: u64) -> Option<u64> {
    if elapsed_ticks == 0 {
        return None;
    }
    u64::try_from((elapsed_ns << 32) / u128::from(elapsed_ticks)).ok()
}

fn scale(ticks: u64, rate: u64) -> u64 {
    u64::try_from((u128::from(ticks) * u128::from(rate)) >> 32).unwrap_or(u64::MAX)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn fixed_point_rate_converts_ticks() {
        // A 2.5 GHz counter: 0.4 ns per tick.
        let rate = rate_of(1_000_000_000, 2_500_000_000).unwrap();
        assert_eq!(scale(2_500_000_000, rate), 999_999_999); // truncated, not rounded
        assert_eq!(scale(25_000, rate), 9_999);
        assert_eq!(scale(0, rate), 0);
        assert_eq!(rate_of(5, 0), None);
        // Saturates rather than wraps.
        assert_eq!(scale(u64::MAX, rate_of(4, 1).unwrap()), u64::MAX);
    }

    #[test]
    fn a_sleep_measures_as_its_length() {
        init();
        let t = now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let ns = to_ns(now().wrapping_sub(t));
        // Generous: a loaded machine oversleeps, never undersleeps.
        assert!(ns >= 20_000_000, "{ns}");
        assert!(ns < 20_000_000_000, "{ns}");
    }
}
