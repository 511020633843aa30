//! W0: the limit. The benchmark payload (malloc'd, as the C workloads do) handed from one
//! thread to another through a bounded lock-free queue (crossbeam `ArrayQueue`, capacity
//! 1024); the consumer frees it. Both sides spin when the queue is full / empty (after
//! 128 failed polls in a row they yield the CPU between polls, so that a machine busy with
//! something else does not turn the spinning into time-slice-long stalls).

use crossbeam_queue::ArrayQueue;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

extern "C" {
    fn malloc(size: usize) -> *mut c_void;
    fn free(p: *mut c_void);
}

/// The benchmark payload, as in bench.c.
#[repr(C)]
struct Payload {
    seq: u64,
    t_ns: u64,
}

struct Ptr(*mut Payload);
// SAFETY: the pointer is handed over whole; only one side owns it at a time.
unsafe impl Send for Ptr {}

const CAPACITY: usize = 1024;
const SPINS_BEFORE_YIELD: u32 = 128;

fn backoff(fails: &mut u32) {
    if *fails < SPINS_BEFORE_YIELD {
        *fails += 1;
        std::hint::spin_loop();
    } else {
        thread::yield_now();
    }
}

fn mono_ns(origin: Instant) -> u64 {
    origin.elapsed().as_nanos() as u64
}

/// Pushes `warmup` then `n` payloads from the calling thread to a consumer thread.
/// Returns the timed part's messages per second (end to end: until the consumer has
/// taken and freed the last one).
fn run(n: u64, warmup: u64) -> f64 {
    let q = Arc::new(ArrayQueue::<Ptr>::new(CAPACITY));
    let warmed = Arc::new(AtomicBool::new(false));
    let end_ns = Arc::new(AtomicU64::new(0));
    let origin = Instant::now();

    let consumer = {
        let q = Arc::clone(&q);
        let warmed = Arc::clone(&warmed);
        let end_ns = Arc::clone(&end_ns);
        thread::spawn(move || {
            let total = warmup + n;
            let mut seen: u64 = 0;
            let mut sum: u64 = 0;
            let mut fails = 0;
            while seen < total {
                match q.pop() {
                    Some(Ptr(p)) => {
                        fails = 0;
                        // SAFETY: the producer malloc'd and filled it; we own it now.
                        unsafe {
                            sum = sum.wrapping_add((*p).seq);
                            free(p.cast());
                        }
                        seen += 1;
                        if seen == warmup {
                            warmed.store(true, Ordering::Release);
                        }
                    }
                    None => backoff(&mut fails),
                }
            }
            end_ns.store(mono_ns(origin), Ordering::Release);
            sum
        })
    };

    let produce = |from: u64, to: u64| {
        for seq in from..to {
            // SAFETY: plain malloc of a POD struct, checked for NULL.
            let p = unsafe { malloc(std::mem::size_of::<Payload>()) } as *mut Payload;
            assert!(!p.is_null(), "malloc failed");
            // SAFETY: p is valid for writes.
            unsafe {
                p.write(Payload {
                    seq,
                    t_ns: mono_ns(origin),
                })
            };
            let mut item = Ptr(p);
            let mut fails = 0;
            loop {
                match q.push(item) {
                    Ok(()) => break,
                    Err(back) => {
                        item = back;
                        backoff(&mut fails);
                    }
                }
            }
        }
    };

    produce(0, warmup);
    if warmup == 0 {
        warmed.store(true, Ordering::Release);
    }
    let mut fails = 0;
    while !warmed.load(Ordering::Acquire) {
        backoff(&mut fails);
    }
    let start = mono_ns(origin);
    produce(warmup, warmup + n);
    let _ = consumer.join();
    let end = end_ns.load(Ordering::Acquire);
    let secs = (end.saturating_sub(start)) as f64 / 1e9;
    if secs <= 0.0 {
        0.0
    } else {
        n as f64 / secs
    }
}

/// W0: msgs/s of the bare queue hop for `n` payloads (after a warm-up of n/10).
#[no_mangle]
pub extern "C" fn sbbench_w0(n: u64) -> f64 {
    std::panic::catch_unwind(|| run(n, (n / 10).max(1000))).unwrap_or(-1.0)
}
