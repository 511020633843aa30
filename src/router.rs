//! Message routers: one subscription that dispatches each message to the route of its
//! type (cache updates by the type of their snapshot), else to a default route.
//!
//! Routes live in an immutable table swapped whole on add/remove, so dispatch reads it
//! without a lock. Without a default route the subscription accepts only routed types
//! (plus subscription changes, for its final message), so publishers skip it for
//! everything else.

use crate::caching_topic::{update_type, CacheUpdate};
use crate::error::{Error, Result};
use crate::mailbox::Kind;
use crate::message::MessageRef;
use crate::message_type::{MessageType, DEAD_MAGIC};
use crate::subscription::{change_type, Callback, Subscription};
use crate::topic::Topic;
use crate::worker_group::Group;
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

pub(crate) const ROUTER_MAGIC: u32 = 0x5342_5254; // "SBRT"

type Route = Arc<(Arc<MessageType>, Callback)>;

#[derive(Clone, Default)]
struct Routes {
    by_type: HashMap<u32, Route>,
    by_snapshot_type: HashMap<u32, Route>,
    default: Option<Arc<Callback>>,
}

impl Routes {
    fn dispatch(&self, sub: &Arc<Subscription>, msg: &MessageRef) {
        let ty = msg.message_type();
        if Arc::ptr_eq(ty, update_type()) {
            if let Some(update) = msg.value::<CacheUpdate>() {
                if let Some(route) = self.by_snapshot_type.get(&update.snapshot_type().id()) {
                    return (route.1)(sub, msg);
                }
            }
        }
        if let Some(route) = self.by_type.get(&ty.id()) {
            (route.1)(sub, msg)
        } else if let Some(default) = &self.default {
            default(sub, msg)
        }
    }
}

#[repr(C)]
pub struct Router {
    magic: u32,
    routes: Arc<ArcSwap<Routes>>,
    /// Serializes route changes with the filter update that goes with them.
    write: Mutex<()>,
    sub: Arc<Subscription>,
}

impl Router {
    /// A router on a thread of its own (`Kind::Dedicated`) or on the pool.
    pub fn new(topic: &Arc<Topic>, kind: Kind) -> Result<Arc<Router>> {
        Router::build(|callback| Subscription::subscribe(topic, kind, callback))
    }

    /// A router run by the worker group `group`.
    pub fn new_in(topic: &Arc<Topic>, group: &Arc<Group>) -> Result<Arc<Router>> {
        Router::build(|callback| Subscription::subscribe_in(topic, group, callback))
    }

    fn build(subscribe: impl FnOnce(Callback) -> Result<Arc<Subscription>>) -> Result<Arc<Router>> {
        let routes: Arc<ArcSwap<Routes>> = Arc::new(ArcSwap::from_pointee(Routes::default()));
        let table = Arc::clone(&routes);
        let callback: Callback = Box::new(move |sub, msg| table.load().dispatch(sub, msg));
        let sub = subscribe(callback)?;
        let router = Arc::new(Router {
            magic: ROUTER_MAGIC,
            routes,
            write: Mutex::new(()),
            sub,
        });
        router.update(|_| Ok(()))?;
        Ok(router)
    }

    pub(crate) fn magic_ok(&self) -> bool {
        self.magic == ROUTER_MAGIC
    }
    pub fn subscription(&self) -> &Arc<Subscription> {
        &self.sub
    }

    fn update(&self, f: impl FnOnce(&mut Routes) -> Result<()>) -> Result<()> {
        let _w = self.write.lock();
        let mut routes = Routes::clone(&self.routes.load());
        f(&mut routes)?;
        let filter = &self.sub.filter;
        if routes.default.is_some() {
            filter.set_selective(false);
        } else {
            filter.replace_accepted(
                std::iter::once(change_type())
                    .chain(routes.by_type.values().map(|r| &r.0))
                    .chain((!routes.by_snapshot_type.is_empty()).then(update_type)),
            );
        }
        self.routes.store(Arc::new(routes));
        Ok(())
    }

    /// Routes messages of `ty` to `cb` (replacing a previous route for `ty`).
    pub fn add(&self, ty: &Arc<MessageType>, cb: Callback) -> Result<()> {
        self.update(|r| {
            r.by_type.insert(ty.id(), Arc::new((Arc::clone(ty), cb)));
            Ok(())
        })
    }

    /// Routes cache updates whose snapshot is of type `ty` to `cb`.
    pub fn add_cache_update(&self, ty: &Arc<MessageType>, cb: Callback) -> Result<()> {
        self.update(|r| {
            r.by_snapshot_type
                .insert(ty.id(), Arc::new((Arc::clone(ty), cb)));
            Ok(())
        })
    }

    pub fn remove(&self, ty: &MessageType) -> Result<()> {
        self.update(|r| {
            r.by_type
                .remove(&ty.id())
                .map(drop)
                .ok_or_else(|| Error::invalid(format!("router has no route for '{}'", ty.name())))
        })
    }

    pub fn remove_cache_update(&self, ty: &MessageType) -> Result<()> {
        self.update(|r| {
            r.by_snapshot_type
                .remove(&ty.id())
                .map(drop)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "router has no cache update route for '{}'",
                        ty.name()
                    ))
                })
        })
    }

    /// Sets the route for everything no other route takes (and accepts every type).
    pub fn set_default(&self, cb: Callback) -> Result<()> {
        self.update(|r| {
            r.default = Some(Arc::new(cb));
            Ok(())
        })
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.magic = DEAD_MAGIC;
    }
}
