//! Message types: named, refcounted, with a small dense id used by publish-time filters.

use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::names::check_name;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::sync::{Arc, LazyLock, Weak};

pub(crate) const TYPE_MAGIC: u32 = 0x5342_5459; // "SBTY"
pub(crate) const DEAD_MAGIC: u32 = 0xdead_dead;

/// Renders a message as JSON text (the wire codecs will sit beside it).
pub type ToJsonFn = Box<dyn Fn(&Message) -> Option<String> + Send + Sync>;

/// A message type. Two live types never share a name.
#[repr(C)]
pub struct MessageType {
    magic: u32,
    id: u32,
    name: CString,
    to_json: Option<ToJsonFn>,
}

impl MessageType {
    pub(crate) fn magic_ok(&self) -> bool {
        self.magic == TYPE_MAGIC
    }

    /// Creates the type `name`, or returns the live type that already holds that name.
    /// Fails with [`ErrorKind::Declined`] when the name was declined.
    pub fn create(name: &str, to_json: Option<ToJsonFn>) -> Result<Arc<MessageType>> {
        check_name("message type", name)?;
        let mut reg = REGISTRY.lock();
        if reg.declined.contains(name) {
            return Err(Error::new(
                ErrorKind::Declined,
                format!("message type '{name}' is declined"),
            ));
        }
        if let Some(live) = reg.by_name.get(name).and_then(Weak::upgrade) {
            return Ok(live);
        }
        let id = match reg.free_ids.pop() {
            Some(id) => id,
            None => {
                reg.next_id += 1;
                reg.next_id - 1
            }
        };
        let ty = Arc::new(MessageType {
            magic: TYPE_MAGIC,
            id,
            name: CString::new(name).expect("checked for NUL"),
            to_json,
        });
        reg.by_name.insert(name.into(), Arc::downgrade(&ty));
        Ok(ty)
    }

    /// A type the library itself owns for as long as the process runs.
    pub(crate) fn builtin(name: &str) -> Arc<MessageType> {
        let ty = MessageType::create(name, None).expect("builtin type names are never declined");
        // Builtins are static: keep one reference forever so the id is never recycled.
        std::mem::forget(Arc::clone(&ty));
        ty
    }

    pub fn name(&self) -> &str {
        self.name.to_str().expect("names are UTF-8")
    }
    pub(crate) fn name_cstr(&self) -> &std::ffi::CStr {
        &self.name
    }
    /// Small dense integer; ids of dropped types are reused.
    pub fn id(&self) -> u32 {
        self.id
    }
    pub fn to_json(&self, msg: &Message) -> Option<String> {
        self.to_json.as_ref().and_then(|f| f(msg))
    }

    /// Makes later creates of `name` fail. Live types of that name stay usable.
    pub fn decline(name: &str) -> Result<()> {
        check_name("message type", name)?;
        REGISTRY.lock().declined.insert(name.into());
        Ok(())
    }
    pub fn is_declined(name: &str) -> bool {
        REGISTRY.lock().declined.contains(name)
    }
}

impl Drop for MessageType {
    fn drop(&mut self) {
        let mut reg = REGISTRY.lock();
        let name = self.name();
        // A new type of the same name may already hold the slot: remove only our own.
        if let Some(w) = reg.by_name.get(name) {
            if std::ptr::eq(w.as_ptr(), self) {
                reg.by_name.remove(name);
            }
        }
        reg.free_ids.push(self.id);
        drop(reg);
        self.magic = DEAD_MAGIC;
    }
}

impl std::fmt::Debug for MessageType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MessageType({}#{})", self.name(), self.id)
    }
}

#[derive(Default)]
struct Registry {
    by_name: HashMap<Box<str>, Weak<MessageType>>,
    declined: HashSet<Box<str>>,
    free_ids: Vec<u32>,
    next_id: u32,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(Default::default);

/// Takes the registry lock for fork() (see `fork`).
pub(crate) fn fork_lock() {
    std::mem::forget(REGISTRY.lock());
}

/// Releases the lock `fork_lock` took.
///
/// # Safety
/// Only after `fork_lock` on this thread (or in a child forked from it).
pub(crate) unsafe fn fork_unlock() {
    // SAFETY: per the contract above, the lock is held and its guard was forgotten.
    unsafe { REGISTRY.force_unlock() };
}
