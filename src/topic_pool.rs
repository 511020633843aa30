//! Topic pools: per-object topics ("<pooled>/<name>") that forward into one pooled topic,
//! as Stasis does for per-channel and per-endpoint topics.

use crate::error::{Error, Result};
use crate::forward::Forward;
use crate::message_type::DEAD_MAGIC;
use crate::names::check_name;
use crate::topic::Topic;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

pub(crate) const TOPIC_POOL_MAGIC: u32 = 0x5342_504c; // "SBPL"

struct Entry {
    topic: Arc<Topic>,
    forward: Arc<Forward>,
}

#[repr(C)]
pub struct TopicPool {
    magic: u32,
    pooled: Arc<Topic>,
    entries: Mutex<HashMap<Box<str>, Entry>>,
}

impl TopicPool {
    pub fn new(pooled: &Arc<Topic>) -> Arc<TopicPool> {
        Arc::new(TopicPool {
            magic: TOPIC_POOL_MAGIC,
            pooled: Arc::clone(pooled),
            entries: Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn magic_ok(&self) -> bool {
        self.magic == TOPIC_POOL_MAGIC
    }

    pub fn pooled_topic(&self) -> &Arc<Topic> {
        &self.pooled
    }

    /// The pool's topic for `name`, created (and forwarded into the pooled topic) on
    /// first use.
    pub fn get_topic(&self, name: &str) -> Result<Arc<Topic>> {
        check_name("pool topic", name)?;
        let mut entries = self.entries.lock();
        if let Some(e) = entries.get(name) {
            return Ok(Arc::clone(&e.topic));
        }
        let full = format!("{}/{}", self.pooled.name(), name);
        let topic = Topic::create(&full)?;
        let forward = Forward::create(&topic, &self.pooled)?;
        entries.insert(
            name.into(),
            Entry {
                topic: Arc::clone(&topic),
                forward,
            },
        );
        Ok(topic)
    }

    /// Removes `name` from the pool and stops its forward. Holders of the topic keep it.
    pub fn delete_topic(&self, name: &str) -> Result<()> {
        check_name("pool topic", name)?;
        let removed = self.entries.lock().remove(name);
        match removed {
            Some(e) => {
                let _ = e.forward.cancel();
                Ok(())
            }
            None => Err(Error::invalid(format!(
                "topic pool '{}' has no topic '{name}'",
                self.pooled.name()
            ))),
        }
    }

    pub fn topic_exists(&self, name: &str) -> bool {
        self.entries.lock().contains_key(name)
    }
}

impl Drop for TopicPool {
    fn drop(&mut self) {
        for (_, e) in self.entries.get_mut().drain() {
            let _ = e.forward.cancel();
        }
        self.magic = DEAD_MAGIC;
    }
}
