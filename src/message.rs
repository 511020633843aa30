//! Messages: immutable, refcounted, typed payloads.

use crate::eid::Eid;
use crate::message_ref::InlineValue;
use crate::message_type::{MessageType, TypeRef, DEAD_MAGIC};
use std::any::Any;
use std::ffi::c_void;
use std::sync::Arc;

pub use crate::message_ref::MessageRef;

pub(crate) const MESSAGE_MAGIC: u32 = 0x5342_4d53; // "SBMS"

/// Destructor of a C payload.
pub type DataDtor = unsafe extern "C" fn(data: *mut c_void);

/// What a message carries.
pub enum Payload {
    /// A C pointer with its destructor, run exactly once when the message dies.
    Raw {
        data: *mut c_void,
        dtor: Option<DataDtor>,
    },
    /// A private copy of some bytes.
    Bytes(Box<[u8]>),
    /// A Rust value. For library messages read from C (subscription changes, cache
    /// updates) the value is `#[repr(C)]` with the C view as its first field, so the
    /// address of the value is the `void *` C code reads.
    Value(Box<dyn Any + Send + Sync>),
    /// A Rust value as `Value`, in the message's own block (`message_ref`): what
    /// `Message::with_value` makes of values that fit.
    Inline(InlineValue),
}

/// An immutable message.
#[repr(C)]
pub struct Message {
    magic: u32,
    /// Not counted: types live as long as the process (see `message_type`).
    mtype: TypeRef,
    payload: Payload,
    timestamp_ns: u64,
    /// None for an aggregate (cluster-wide) message.
    eid: Option<Eid>,
}

// SAFETY: a message is immutable after creation. `Payload::Raw` holds a C pointer the
// library never dereferences; its owner promised (API.md) that the data may be read from
// any thread and that the dtor may run on whichever thread drops the last reference.
unsafe impl Send for Message {}
// SAFETY: as above; no interior mutability.
unsafe impl Sync for Message {}

/// CLOCK_REALTIME in ns. Straight from clock_gettime (a vDSO call): `SystemTime`'s
/// checked arithmetic showed up in the publish profile.
pub(crate) fn now_realtime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec; CLOCK_REALTIME always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

impl Message {
    /// A message from this node (the default eid). Messages only exist counted, so the
    /// constructors return the counted reference.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(mtype: &Arc<MessageType>, payload: Payload) -> MessageRef {
        MessageRef::new(Message::local(mtype, payload))
    }

    /// A message from `eid`, or an aggregate when `eid` is None.
    pub fn with_eid(mtype: &Arc<MessageType>, payload: Payload, eid: Option<Eid>) -> MessageRef {
        Message::with_eid_at(mtype, payload, eid, now_realtime_ns())
    }

    /// A message from `eid` stamped `timestamp_ns` (CLOCK_REALTIME): a message that
    /// another node made keeps its own time.
    pub fn with_eid_at(
        mtype: &Arc<MessageType>,
        payload: Payload,
        eid: Option<Eid>,
        timestamp_ns: u64,
    ) -> MessageRef {
        MessageRef::new(Message::build(mtype, payload, eid, timestamp_ns))
    }

    /// A message from this node, stamped now: what `new` and `with_value` make.
    fn local(mtype: &Arc<MessageType>, payload: Payload) -> Message {
        Message::build(mtype, payload, Some(Eid::default_eid()), now_realtime_ns())
    }

    fn build(
        mtype: &Arc<MessageType>,
        payload: Payload,
        eid: Option<Eid>,
        timestamp_ns: u64,
    ) -> Message {
        Message {
            magic: MESSAGE_MAGIC,
            mtype: TypeRef::new(mtype),
            payload,
            timestamp_ns,
            eid,
        }
    }

    /// A message from this node carrying a Rust value: in the message's own block when
    /// it fits (the library's own messages all do), else boxed.
    pub fn with_value<T: Any + Send + Sync>(mtype: &Arc<MessageType>, value: T) -> MessageRef {
        MessageRef::with_inline(value, |payload| Message::local(mtype, payload))
            .unwrap_or_else(|value| Message::new(mtype, Payload::Value(Box::new(value))))
    }

    pub(crate) fn magic_ok(&self) -> bool {
        self.magic == MESSAGE_MAGIC
    }
    pub fn message_type(&self) -> &Arc<MessageType> {
        &self.mtype
    }
    pub fn payload(&self) -> &Payload {
        &self.payload
    }
    /// The `void *` C code sees.
    pub fn data_ptr(&self) -> *mut c_void {
        match &self.payload {
            Payload::Raw { data, .. } => *data,
            Payload::Bytes(b) => b.as_ptr() as *mut c_void,
            Payload::Value(v) => value_ptr(&**v),
            Payload::Inline(v) => value_ptr(&**v),
        }
    }
    /// The Rust value, boxed or inline.
    fn any_value(&self) -> Option<&(dyn Any + Send + Sync)> {
        match &self.payload {
            Payload::Value(v) => Some(&**v),
            Payload::Inline(v) => Some(&**v),
            _ => None,
        }
    }
    pub fn data_len(&self) -> usize {
        match &self.payload {
            Payload::Bytes(b) => b.len(),
            _ => 0,
        }
    }
    pub fn value<T: Any>(&self) -> Option<&T> {
        self.any_value()?.downcast_ref()
    }
    pub fn timestamp_ns(&self) -> u64 {
        self.timestamp_ns
    }
    pub fn eid(&self) -> Option<&Eid> {
        self.eid.as_ref()
    }
}

/// The address of a Rust value, as C reads it (`Payload::Value`).
fn value_ptr(v: &(dyn Any + Send + Sync)) -> *mut c_void {
    (v as *const (dyn Any + Send + Sync))
        .cast::<c_void>()
        .cast_mut()
}

impl Drop for Message {
    fn drop(&mut self) {
        self.magic = DEAD_MAGIC;
        if let Payload::Raw {
            data,
            dtor: Some(dtor),
        } = self.payload
        {
            // SAFETY: the creator handed us `data` with this dtor; the last reference is
            // going away, so this is the one and only call.
            unsafe { dtor(data) };
        }
    }
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Message({:?}, eid {:?})", self.mtype, self.eid)
    }
}
