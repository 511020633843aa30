//! Worker groups: named pools with limits of their own (`sb_pool_*`), so that one
//! module's slow callbacks hold only its own group's workers, not another module's.
//!
//! A group is in use while a reference, a subscription (until its final message has
//! been handled) or a queued task holds it; the count of those uses is the group's life.
//! When it falls to zero the group leaves the registry (its name is free again) and its
//! pool is closed, so its threads exit. The group's memory is separate from that life:
//! an `Arc` that finished subscriptions keep (they may linger in their topic's list)
//! without keeping any thread.
//!
//! The shared pool is the group "default": it holds a use of its own, so it never ends.

use crate::error::{Error, Result};
use crate::message_type::DEAD_MAGIC;
use crate::pool::{ForkHold, Limits, Pool, PoolStats};
use crate::sync::std_sync::{Mutex, MutexGuard};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

pub(crate) const GROUP_MAGIC: u32 = 0x5342_5047; // "SBPG"
/// The shared pool's group name.
pub(crate) const SHARED_NAME: &str = "default";

pub struct Group {
    magic: u32,
    name: String,
    /// References, unfinished subscriptions and queued tasks (see the module comment).
    uses: AtomicUsize,
    pool: Arc<Pool>,
}

static SHARED: LazyLock<Arc<Group>> = LazyLock::new(|| {
    crate::fork::install();
    // Its own use, never released.
    Group::new(SHARED_NAME, Limits::default_shared())
});

/// Live groups by name, the shared one included. Never locked while a group's pool
/// lock is held (fork takes this one first, then the pools').
static REGISTRY: LazyLock<Mutex<HashMap<String, Arc<Group>>>> = LazyLock::new(|| {
    let shared = Arc::clone(&SHARED);
    Mutex::new(HashMap::from([(SHARED_NAME.to_owned(), shared)]))
});

/// The shared pool's group ("default").
pub fn shared() -> &'static Arc<Group> {
    &SHARED
}

/// The group named `name`, created with these limits if there is none (one use for the
/// caller). An existing group is returned only if its limits are these.
pub fn create(
    name: &str,
    min_threads: usize,
    max_threads: usize,
    idle_timeout: Duration,
) -> Result<Arc<Group>> {
    check_name(name)?;
    let limits = Limits::new(min_threads, max_threads, idle_timeout)?;
    crate::fork::install();
    let found = {
        let mut reg = REGISTRY.lock();
        match reg.get(name) {
            Some(g) => {
                g.uses.fetch_add(1, Ordering::SeqCst);
                Arc::clone(g)
            }
            None => {
                let g = Group::new(name, limits);
                reg.insert(name.to_owned(), Arc::clone(&g));
                return Ok(g);
            }
        }
    };
    // Outside the registry lock: releasing the use may end the group, which takes it.
    let have = found.pool.limits();
    if have != limits {
        found.release();
        return Err(Error::invalid(format!(
            "worker group '{name}' exists with other limits (min {}, max {}, idle timeout {} ms)",
            have.min,
            have.max,
            have.idle_timeout.as_millis()
        )));
    }
    Ok(found)
}

/// The live group named `name` (one use for the caller), if any.
pub fn get(name: &str) -> Option<Arc<Group>> {
    let reg = REGISTRY.lock();
    let g = reg.get(name)?;
    // A group whose uses just fell to zero is still here until its ending takes this
    // lock; taking a use now keeps it (the ending looks again under the lock).
    g.uses.fetch_add(1, Ordering::SeqCst);
    Some(Arc::clone(g))
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid("worker group name is empty"));
    }
    Ok(())
}

/// Keeps a group in use while it lives (a queued task's hold).
struct Use(Arc<Group>);
impl Drop for Use {
    fn drop(&mut self) {
        self.0.release();
    }
}

impl Group {
    /// A new group with one use.
    fn new(name: &str, limits: Limits) -> Arc<Group> {
        Arc::new(Group {
            magic: GROUP_MAGIC,
            name: name.to_owned(),
            uses: AtomicUsize::new(1),
            pool: Pool::new(name, limits),
        })
    }

    pub(crate) fn magic_ok(&self) -> bool {
        self.magic == GROUP_MAGIC
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub(crate) fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
    /// Still in use (its pool not closed).
    pub fn is_live(&self) -> bool {
        !self.pool.is_closed()
    }

    /// New limits; take effect at once.
    pub fn reconfigure(
        &self,
        min_threads: usize,
        max_threads: usize,
        idle_timeout: Duration,
    ) -> Result<()> {
        self.pool
            .configure(Limits::new(min_threads, max_threads, idle_timeout)?);
        Ok(())
    }

    /// One more use. The caller holds one already (a reference, or the subscription or
    /// task that is using the group), so the group cannot have ended.
    pub fn acquire(&self) {
        self.uses.fetch_add(1, Ordering::SeqCst);
    }

    /// Gives a use back; the last one ends the group.
    pub fn release(&self) {
        let previous = self
            .uses
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if previous != Ok(1) {
            return;
        }
        let removed = {
            let mut reg = REGISTRY.lock();
            if self.uses.load(Ordering::SeqCst) != 0 {
                return; // a lookup took a use meanwhile: the group goes on
            }
            match reg.get(&self.name) {
                Some(g) if std::ptr::eq(Arc::as_ptr(g), self) => reg.remove(&self.name),
                _ => None,
            }
        };
        self.pool.close();
        // Outside the lock: it may be the last reference of the group's memory.
        drop(removed);
    }

    /// Runs `task` once on one of this group's workers. Fails with `State` when the group
    /// has ended (the caller's reference was not one: it was released already).
    pub fn submit(self: &Arc<Self>, task: impl FnOnce() + Send + 'static) -> Result<()> {
        if !self.is_live() {
            return Err(Error::state(format!(
                "worker group '{}' has ended",
                self.name
            )));
        }
        self.acquire();
        let hold = Use(Arc::clone(self));
        self.pool.submit(Box::new(move || {
            let _hold = hold;
            task();
        }));
        Ok(())
    }

    /// This group's figures now.
    pub fn stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Worker threads that have started and not yet exited (they exit shortly after
    /// the group ended).
    pub fn started_threads(&self) -> usize {
        self.pool.started_threads()
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.magic = DEAD_MAGIC;
    }
}

/// Every live group's name and figures, the shared one first, then by name.
pub fn all_stats() -> Vec<(String, PoolStats)> {
    let mut groups: Vec<Arc<Group>> = REGISTRY.lock().values().cloned().collect();
    groups.sort_by(|a, b| (a.name != SHARED_NAME, &a.name).cmp(&(b.name != SHARED_NAME, &b.name)));
    groups.iter().map(|g| (g.name.clone(), g.stats())).collect()
}

struct ForkHolds {
    // Declared first: the pools' locks are released before the registry's.
    pools: Vec<ForkHold>,
    _registry: MutexGuard<'static, HashMap<String, Arc<Group>>>,
}

thread_local! {
    /// The registry's and the groups' pool locks held across fork() by the forking thread.
    static FORK_HOLDS: RefCell<Option<ForkHolds>> = const { RefCell::new(None) };
}

/// Takes the registry lock, then every live group's pool lock, for fork() (see `fork`).
pub(crate) fn fork_lock() {
    let registry = REGISTRY.lock();
    let pools = registry
        .values()
        .map(|g| ForkHold::lock(Arc::clone(&g.pool)))
        .collect();
    FORK_HOLDS.with(|h| {
        *h.borrow_mut() = Some(ForkHolds {
            pools,
            _registry: registry,
        })
    });
}

/// Releases the locks `fork_lock` took (in the parent, or in a child: the forking
/// thread is the child's thread, with its thread-locals).
pub(crate) fn fork_unlock() {
    FORK_HOLDS.with(|h| drop(h.borrow_mut().take()));
}

/// In a forked child: no worker survived, so every group forgets them (new ones start
/// as work arrives), then the locks are released.
pub(crate) fn fork_reset_and_unlock() {
    FORK_HOLDS.with(|h| {
        if let Some(holds) = h.borrow_mut().as_mut() {
            for p in &mut holds.pools {
                p.reset_in_child();
            }
        }
    });
    fork_unlock();
}
