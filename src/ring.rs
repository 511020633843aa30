//! A subscription's lock-free front queue: a bounded multi-producer ring that the
//! mailbox's runner drains under the mailbox lock.
//!
//! Why: a locked push writes the lock's line, the queue's header and its slot, and the
//! lock's line moves back to the runner's core at every batch it takes. A push into the
//! ring writes the tail word (shared by publishers only) and one slot, which is the line
//! the runner reads anyway.
//!
//! The ring only takes a push while it is *open*, and it is open only while the runner
//! is committed to look at it again (running, scheduled, or a dedicated thread that has
//! not parked): a push into an open ring never has to wake or schedule anybody. The
//! runner closes it (under the mailbox lock) before it goes idle or parks, and so does
//! a locked push (the slow paths: overflow policies, the final message, a full ring,
//! sync publish watchers), so the locked queue only ever holds items queued after
//! everything in the ring. A runner drains the ring before it looks at the locked
//! queue, and reopens the ring only once the locked queue is empty: per-thread order
//! holds across the two queues.
//!
//! The open flag lives in the tail word, so closing is one atomic operation that every
//! later claim sees: after it, the ring's contents only shrink.
//!
//! Slots follow Dmitry Vyukov's bounded queue: slot `i` holds a sequence number that
//! says whether position `pos` (with `pos % capacity == i`) is free to write (`pos`),
//! written and not yet taken (`pos + 1`), or taken (`pos + capacity`, free for the next
//! lap). A producer claims a position with a CAS on the tail and publishes its slot with
//! a release store of the sequence number; the consumer (one at a time: it holds the
//! mailbox lock) reads it with an acquire load.

use crate::message::{Message, MessageRef};
use crate::sync::{AtomicPtr, AtomicUsize};
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

/// Slots of a ring (a power of two). Big enough that a publisher streaming at full
/// speed fills it in well over the runner's coalescing wait; small enough that a busy
/// subscription's ring is about 2 KB.
#[cfg(not(loom))]
pub(crate) const RING_SLOTS: usize = 128;
/// Two slots: the models reach the full ring and the wrap-around in a few pushes.
#[cfg(loom)]
pub(crate) const RING_SLOTS: usize = 2;

/// Tail word bit: the ring takes pushes.
const OPEN: usize = 1;

struct Slot {
    seq: AtomicUsize,
    msg: AtomicPtr<Message>,
}

/// The publishers' words (written by every push) and the runner's (written per batch),
/// on separate cache lines.
#[repr(C, align(64))]
struct ProducerSide {
    /// `claimed positions << 1 | OPEN`.
    tail: AtomicUsize,
    /// Items the mailbox queued through its locked queue before the ring last opened:
    /// an item at ring position `pos` is the mailbox's item number `base + pos + 1`.
    seq_base: AtomicUsize,
}

#[repr(C, align(64))]
struct ConsumerSide {
    /// Next position to take (written under the mailbox lock; atomic for `len`).
    head: AtomicUsize,
}

pub(crate) struct Ring {
    producer: ProducerSide,
    consumer: ConsumerSide,
    slots: Box<[Slot]>,
}

/// What `Ring::drain` found after the items it took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rest {
    /// Nothing more: every claimed position was taken.
    Empty,
    /// A producer claimed the next position and has not written it yet (a few
    /// instructions away, unless it was preempted).
    Pending,
}

impl Ring {
    /// A closed, empty ring.
    pub(crate) fn new() -> Ring {
        Ring {
            producer: ProducerSide {
                tail: AtomicUsize::new(0),
                seq_base: AtomicUsize::new(0),
            },
            consumer: ConsumerSide {
                head: AtomicUsize::new(0),
            },
            slots: (0..RING_SLOTS)
                .map(|i| Slot {
                    seq: AtomicUsize::new(i),
                    msg: AtomicPtr::new(std::ptr::null_mut()),
                })
                .collect(),
        }
    }

    /// Queues `msg` if the ring is open and has room, returning the item's sequence
    /// number in the mailbox; gives it back otherwise (the caller takes the locked path).
    #[inline]
    pub(crate) fn try_push(&self, msg: MessageRef) -> Result<u64, MessageRef> {
        let mut tail = self.producer.tail.load(Relaxed);
        loop {
            if tail & OPEN == 0 {
                return Err(msg);
            }
            let pos = tail >> 1;
            let slot = &self.slots[pos % RING_SLOTS];
            let seq = slot.seq.load(Acquire);
            if seq != pos {
                if seq < pos {
                    // The slot still holds the item of the previous lap: full.
                    return Err(msg);
                }
                // Another producer claimed `pos` since we read the tail.
                tail = self.producer.tail.load(Relaxed);
                continue;
            }
            // Acquire: pairs with `open`'s release, so `seq_base` is the one it wrote.
            match self
                .producer
                .tail
                .compare_exchange_weak(tail, tail + 2, Acquire, Relaxed)
            {
                Ok(_) => {
                    let base = self.producer.seq_base.load(Relaxed);
                    slot.msg
                        .store(MessageRef::into_raw(msg).cast_mut(), Relaxed);
                    slot.seq.store(pos + 1, Release);
                    return Ok((base + pos + 1) as u64);
                }
                Err(now) => tail = now,
            }
        }
    }

    /// Consumer (mailbox lock held): hands every written item, in order, to `put`, and
    /// says how many. It reads the slots only, never the tail (see `rest`).
    pub(crate) fn drain(&self, mut put: impl FnMut(MessageRef)) -> usize {
        let mut head = self.consumer.head.load(Relaxed);
        let start = head;
        loop {
            let slot = &self.slots[head % RING_SLOTS];
            if slot.seq.load(Acquire) != head + 1 {
                break;
            }
            let raw = slot.msg.load(Relaxed);
            slot.seq.store(head + RING_SLOTS, Release);
            // SAFETY: the producer that claimed `head` stored `Arc::into_raw` of its
            // message here before publishing the slot (the acquire load above saw its
            // release), and only the consumer, which holds the mailbox lock, takes a
            // published slot, once: this reference is ours.
            put(unsafe { MessageRef::from_raw(raw) });
            head += 1;
        }
        if head != start {
            self.consumer.head.store(head, Relaxed);
        }
        head - start
    }

    /// Consumer (mailbox lock held), after a drain: whether a producer claimed a position
    /// it has not written yet. This reads the tail, the line every push writes: a
    /// consumer that read it after every batch (batches of one, when it keeps up) made
    /// the publisher's next claim fetch the line back, so callers ask only when the
    /// answer matters (nothing taken, or the locked queue waits behind the ring).
    pub(crate) fn rest(&self) -> Rest {
        if self.producer.tail.load(Acquire) >> 1 == self.consumer.head.load(Relaxed) {
            Rest::Empty
        } else {
            Rest::Pending
        }
    }

    /// Runner's peek, without the lock: whether the item `ahead` places after the next
    /// one to take is written. Reads a slot's line, which taking the item reads anyway,
    /// not the tail. A hint only: the head it starts from may be a moment old.
    pub(crate) fn peek(&self, ahead: usize) -> bool {
        let pos = self.consumer.head.load(Relaxed) + ahead;
        self.slots[pos % RING_SLOTS].seq.load(Relaxed) == pos + 1
    }

    /// Claimed and not yet taken (racy snapshot; never wraps below zero).
    pub(crate) fn len(&self) -> usize {
        let head = self.consumer.head.load(Relaxed);
        (self.producer.tail.load(Relaxed) >> 1).saturating_sub(head)
    }

    /// Positions ever claimed (exact while the ring is closed).
    pub(crate) fn claimed(&self) -> usize {
        self.producer.tail.load(Acquire) >> 1
    }

    pub(crate) fn is_open(&self) -> bool {
        self.producer.tail.load(Relaxed) & OPEN != 0
    }

    /// Opens the ring (mailbox lock held, ring closed); `locked_pushed`: items queued
    /// through the locked queue so far.
    pub(crate) fn open(&self, locked_pushed: u64) {
        self.producer
            .seq_base
            .store(locked_pushed as usize, Relaxed);
        self.producer.tail.fetch_or(OPEN, Release);
    }

    /// Closes the ring (mailbox lock held); it may still hold items.
    pub(crate) fn close(&self) {
        self.producer.tail.fetch_and(!OPEN, AcqRel);
    }

    /// Closes the ring if it is empty (mailbox lock held): false when a producer claimed
    /// a position since the last drain.
    pub(crate) fn close_if_empty(&self) -> bool {
        let head = self.consumer.head.load(Relaxed);
        let open_empty = head << 1 | OPEN;
        match self
            .producer
            .tail
            .compare_exchange(open_empty, head << 1, AcqRel, Acquire)
        {
            Ok(_) => true,
            // Already closed, and nothing claimed since the drain.
            Err(now) => now == head << 1,
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Nobody pushes any more (the mailbox is going away): take what is left.
        self.drain(drop);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::message_type::MessageType;

    fn msg(n: usize) -> MessageRef {
        let ty = MessageType::create("ring/test", None).unwrap();
        Message::with_value(&ty, n)
    }

    fn take(ring: &Ring) -> (Vec<usize>, Rest) {
        let mut got = Vec::new();
        ring.drain(|m| got.push(*m.value::<usize>().unwrap()));
        (got, ring.rest())
    }

    #[test]
    fn closed_ring_refuses_open_ring_takes_until_full() {
        let ring = Ring::new();
        assert!(ring.try_push(msg(0)).is_err());
        ring.open(5);
        for i in 0..RING_SLOTS {
            assert_eq!(ring.try_push(msg(i)).ok(), Some(5 + i as u64 + 1));
        }
        assert!(ring.try_push(msg(99)).is_err(), "full");
        assert_eq!(ring.len(), RING_SLOTS);
        let (got, rest) = take(&ring);
        assert_eq!(got, (0..RING_SLOTS).collect::<Vec<_>>());
        assert_eq!(rest, Rest::Empty);
        // The next lap reuses the slots.
        assert!(ring.try_push(msg(7)).is_ok());
        assert!(!ring.close_if_empty());
        assert_eq!(take(&ring).0, vec![7]);
        assert!(ring.close_if_empty());
        assert!(!ring.is_open());
        assert!(ring.try_push(msg(8)).is_err());
    }

    #[test]
    fn peeks_see_written_slots_and_rest_sees_claims() {
        let ring = Ring::new();
        ring.open(0);
        assert!(!ring.peek(0));
        for lap in 0..2 {
            for i in 0..3 {
                ring.try_push(msg(i)).unwrap();
            }
            assert!(ring.peek(0) && ring.peek(2), "lap {lap}");
            assert!(!ring.peek(3), "lap {lap}");
            assert_eq!(ring.drain(drop), 3);
            assert!(!ring.peek(0), "lap {lap}");
            assert_eq!(ring.rest(), Rest::Empty);
            // Across the end of the slots on the second lap.
            for _ in 0..RING_SLOTS - 3 {
                ring.try_push(msg(0)).unwrap();
            }
            assert_eq!(ring.drain(drop), RING_SLOTS - 3);
        }
        // A position claimed and not yet written: no peek or drain sees it, `rest` does.
        ring.producer.tail.fetch_add(2, Relaxed);
        assert!(!ring.peek(0));
        assert_eq!(ring.drain(drop), 0);
        assert_eq!(ring.rest(), Rest::Pending);
    }

    #[test]
    fn dropping_a_ring_releases_its_items() {
        let ring = Ring::new();
        ring.open(0);
        let m = msg(1);
        ring.try_push(MessageRef::clone(&m)).unwrap();
        assert_eq!(MessageRef::ref_count(&m), 2);
        drop(ring);
        assert_eq!(MessageRef::ref_count(&m), 1);
    }
}
