//! Codecs: how a message type's data becomes bytes on the wire and back. Bytes messages
//! need none. Kept here, beside the cluster, so the core never learns about encoding.

use crate::message::{Message, Payload};
use crate::message_type::MessageType;
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

/// Encodes a message's data; None: not sent.
pub type EncodeFn = Box<dyn Fn(&Message) -> Option<Vec<u8>> + Send + Sync>;
/// Decodes bytes into a payload; None: dropped (counted).
pub type DecodeFn = Box<dyn Fn(&[u8]) -> Option<Payload> + Send + Sync>;

pub struct Codec {
    pub encode: Option<EncodeFn>,
    pub decode: Option<DecodeFn>,
}

type CodecMap = HashMap<u32, Arc<Codec>>;
static CODECS: LazyLock<ArcSwap<CodecMap>> = LazyLock::new(Default::default);
static WRITE: Mutex<()> = Mutex::new(());

/// Installs (or with both None, removes) the codec of `ty`.
pub fn set(ty: &MessageType, codec: Option<Codec>) {
    let _w = WRITE.lock();
    let mut map = CodecMap::clone(&CODECS.load());
    match codec {
        Some(c) if c.encode.is_some() || c.decode.is_some() => {
            map.insert(ty.id(), Arc::new(c));
        }
        _ => {
            map.remove(&ty.id());
        }
    }
    CODECS.store(Arc::new(map));
}

/// The codec of `ty`, if any.
pub fn get(ty: &MessageType) -> Option<Arc<Codec>> {
    CODECS.load().get(&ty.id()).cloned()
}

/// Whether `msg` can go on the wire at all (cheap: the publish path asks).
pub fn sendable(msg: &Message) -> bool {
    matches!(msg.payload(), Payload::Bytes(_))
        || CODECS
            .load()
            .get(&msg.message_type().id())
            .is_some_and(|c| c.encode.is_some())
}

/// The wire bytes of `msg`'s data and whether they are a bytes message's own bytes.
/// None: not sendable, or the encoder declined.
pub fn encode(msg: &Message) -> Option<(Vec<u8>, bool)> {
    if let Payload::Bytes(b) = msg.payload() {
        return Some((b.to_vec(), true));
    }
    let codec = get(msg.message_type())?;
    let enc = codec.encode.as_ref()?;
    enc(msg).map(|v| (v, false))
}
