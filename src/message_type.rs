//! Message types: named, with a small dense id used by publish-time filters.
//!
//! Types are interned for the life of the process: the registry keeps every type it
//! ever created, so a type's memory never goes away and a message can point at its type
//! without touching a reference count. (A shared count, bumped by the publisher and
//! dropped by the subscriber's thread for every message, was a cache line bouncing
//! between cores on the hottest path.) References handed to C still count, so a type
//! whose users all let go is "dormant": creating its name again revives it with the new
//! creator's functions, which matters when a module that supplied `to_json` is unloaded
//! and loaded again.

use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::names::check_name;
use parking_lot::{Mutex, RwLock};
use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, LazyLock};

pub(crate) const TYPE_MAGIC: u32 = 0x5342_5459; // "SBTY"
pub(crate) const DEAD_MAGIC: u32 = 0xdead_dead;

/// Formatter bits (`Formatters`): what a type can render itself as. Subscriptions accept
/// by these as well as by type (`filter`).
pub(crate) const FORMATTER_JSON: u8 = 1;
/// Every formatter bit defined so far.
pub(crate) const FORMATTERS_KNOWN: u8 = FORMATTER_JSON;

/// Renders a message as JSON text (the wire codecs will sit beside it).
pub type ToJsonFn = Box<dyn Fn(&Message) -> Option<String> + Send + Sync>;

/// A message type. A name always means the same type.
#[repr(C)]
pub struct MessageType {
    magic: u32,
    id: u32,
    name: CString,
    to_json: RwLock<Option<Arc<ToJsonFn>>>,
    /// The formatters this type has now (`FORMATTER_JSON` when `to_json` is set): read
    /// with one relaxed load by publish-time filters, which must not take `to_json`'s
    /// lock. Written with `to_json`, under the registry lock.
    formatters: AtomicU8,
    /// Publishes of messages of this type. On a cache line of its own: every publish
    /// writes it, and subscribers' threads read the fields above.
    #[cfg(not(feature = "no-stats"))]
    published: Padded,
}

#[cfg(not(feature = "no-stats"))]
#[repr(align(128))]
#[derive(Default)]
struct Padded(std::sync::atomic::AtomicU64);

/// A reference to a type that takes no count. What the library keeps of a type for
/// itself is one of these: never dangling, since the registry keeps every type for the
/// life of the process, and never keeping a type from going dormant (see the module
/// comment), which a counted reference would: a module unloaded and loaded again would
/// then keep its old `to_json`, in unmapped code.
#[repr(transparent)]
pub struct TypeRef(ManuallyDrop<Arc<MessageType>>);

impl TypeRef {
    pub fn new(ty: &Arc<MessageType>) -> TypeRef {
        // SAFETY: every type is the registry's (`intern`), which holds a reference to it
        // until the process ends, so the pointer stays valid for as long as this copy
        // can live; ManuallyDrop keeps the copy from releasing a count it never took.
        TypeRef(ManuallyDrop::new(unsafe { Arc::from_raw(Arc::as_ptr(ty)) }))
    }
}

impl Clone for TypeRef {
    fn clone(&self) -> TypeRef {
        // Not the inner Arc's clone: that would take a count that nothing releases.
        TypeRef::new(&self.0)
    }
}

impl Deref for TypeRef {
    type Target = Arc<MessageType>;
    fn deref(&self) -> &Arc<MessageType> {
        &self.0
    }
}

impl std::fmt::Debug for TypeRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self.0, f)
    }
}

impl MessageType {
    pub(crate) fn magic_ok(&self) -> bool {
        self.magic == TYPE_MAGIC
    }

    /// Creates the type `name`, or returns the type that already holds that name (with
    /// `to_json` installed if the type was dormant: no reference outside the registry).
    /// Fails with [`ErrorKind::Declined`] when the name was declined.
    pub fn create(name: &str, to_json: Option<ToJsonFn>) -> Result<Arc<MessageType>> {
        check_name("message type", name)?;
        if REGISTRY.lock().declined.contains(name) {
            return Err(Error::new(
                ErrorKind::Declined,
                format!("message type '{name}' is declined"),
            ));
        }
        Ok(MessageType::intern(name, to_json))
    }

    fn intern(name: &str, to_json: Option<ToJsonFn>) -> Arc<MessageType> {
        let mut reg = REGISTRY.lock();
        if let Some(ty) = reg.by_name.get(name) {
            // Only the registry's own reference: nobody uses the type; take the new
            // creator's functions (the old ones may belong to unloaded code).
            if Arc::strong_count(ty) == 1 {
                let before = ty.formatters();
                let after = formatters_of(&to_json);
                *ty.to_json.write() = to_json.map(Arc::new);
                ty.formatters.store(after, Ordering::Relaxed);
                if before != after {
                    // Formatter-accepting subscriptions now want this type, or no longer.
                    crate::tap::interest_changed();
                }
            }
            return Arc::clone(ty);
        }
        let formatters = formatters_of(&to_json);
        let ty = Arc::new(MessageType {
            magic: TYPE_MAGIC,
            id: reg.by_name.len() as u32,
            name: CString::new(name).expect("checked for NUL"),
            to_json: RwLock::new(to_json.map(Arc::new)),
            formatters: AtomicU8::new(formatters),
            #[cfg(not(feature = "no-stats"))]
            published: Padded::default(),
        });
        reg.by_name.insert(name.into(), Arc::clone(&ty));
        if formatters != 0 {
            // A subscription that accepts this formatter wants the new type: whoever
            // mirrors `Topic::wants` (the cluster's selective import) must look again.
            crate::tap::interest_changed();
        }
        ty
    }

    // The lookups below hand out uncounted references: a count taken by the library,
    // even for a moment, could make a concurrent `create` take a dormant type for a live
    // one (`TypeRef`).

    /// The type named `name`, if one was ever created (never creates one).
    pub fn find(name: &str) -> Option<TypeRef> {
        REGISTRY.lock().by_name.get(name).map(TypeRef::new)
    }

    /// The type whose `id` is `id` (a scan: for statistics, not for hot paths).
    pub fn by_id(id: u32) -> Option<TypeRef> {
        REGISTRY
            .lock()
            .by_name
            .values()
            .find(|t| t.id == id)
            .map(TypeRef::new)
    }

    /// Every type created so far (types are a bounded set: see the module comment).
    pub fn all() -> Vec<TypeRef> {
        REGISTRY.lock().by_name.values().map(TypeRef::new).collect()
    }

    /// A type the library itself uses (never declined).
    pub(crate) fn builtin(name: &str) -> Arc<MessageType> {
        MessageType::intern(name, None)
    }

    pub fn name(&self) -> &str {
        self.name.to_str().expect("names are UTF-8")
    }
    pub(crate) fn name_cstr(&self) -> &std::ffi::CStr {
        &self.name
    }
    /// Small dense integer (0, 1, 2... in creation order).
    pub fn id(&self) -> u32 {
        self.id
    }
    /// Counts one publish of a message of this type.
    #[inline]
    pub(crate) fn count_publish(&self) {
        #[cfg(not(feature = "no-stats"))]
        self.published
            .0
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    /// Publishes of messages of this type so far (0 in a `no-stats` build).
    pub fn published(&self) -> u64 {
        #[cfg(not(feature = "no-stats"))]
        return self.published.0.load(std::sync::atomic::Ordering::Relaxed);
        #[cfg(feature = "no-stats")]
        0
    }
    pub fn has_to_json(&self) -> bool {
        self.to_json.read().is_some()
    }
    /// The formatter bits of this type now (`FORMATTER_JSON`...), without a lock.
    #[inline]
    pub(crate) fn formatters(&self) -> u8 {
        self.formatters.load(Ordering::Relaxed)
    }
    pub fn to_json(&self, msg: &Message) -> Option<String> {
        // Clone out of the lock: to_json is user code.
        let f = self.to_json.read().clone();
        f.and_then(|f| f(msg))
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

impl std::fmt::Debug for MessageType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MessageType({}#{})", self.name(), self.id)
    }
}

fn formatters_of(to_json: &Option<ToJsonFn>) -> u8 {
    if to_json.is_some() {
        FORMATTER_JSON
    } else {
        0
    }
}

#[derive(Default)]
struct Registry {
    /// Every type ever created; ids are indexes in creation order.
    by_name: HashMap<Box<str>, Arc<MessageType>>,
    declined: HashSet<Box<str>>,
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
