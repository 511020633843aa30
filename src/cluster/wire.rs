//! The wire format: NATS subjects, key-value keys and message bodies. Pure functions,
//! no I/O: everything that arrives from the network is parsed here and nowhere else, so
//! this is what the fuzzer drives (`fuzz/fuzz_targets/cluster_wire.rs`). README.md,
//! "Cluster / Wire format", documents every layout below for programs in other languages.
//!
//! Subjects (`P` is the configured prefix, tokens are escaped by [`escape_token`]):
//! - `P.m.<topic>.<type>`         a message of a shared topic, to every node
//! - `P.d.<eid>.<topic>.<type>`   a message for one node (`sb_cluster_publish_to`)
//! - `P.hb`                       heartbeats and leave announcements
//! - `P.json.<topic>.<type>`      JSON export for programs outside the bus
//!
//! Key-value store: bucket `P_state`, keys `<eid>.n` (a node's presence) and
//! `<eid>.c.<topic>.<type>.<id>` (one cached snapshot of that node).

use crate::eid::Eid;
use std::borrow::Cow;

/// Version byte that starts every body.
pub(crate) const VERSION: u8 = 1;
/// Bytes of the envelope before the payload.
pub(crate) const ENVELOPE_LEN: usize = 28;
/// Envelope flag: the payload is the message's bytes (a bytes message, no codec).
pub(crate) const FLAG_BYTES: u8 = 1;
/// Envelope flag: the message is a cache clear of the snapshot it carries.
pub(crate) const FLAG_CLEAR: u8 = 2;
const KNOWN_FLAGS: u8 = FLAG_BYTES | FLAG_CLEAR;

/// Why some wire data was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    TooShort,
    BadVersion,
    BadFlags,
    BadToken,
    BadSubject,
    BadName,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WireError::TooShort => "body shorter than its header",
            WireError::BadVersion => "unknown wire version",
            WireError::BadFlags => "unknown flags",
            WireError::BadToken => "malformed escaped token",
            WireError::BadSubject => "subject of an unknown shape",
            WireError::BadName => "name is not valid UTF-8 or too long",
        })
    }
}

/// Bytes kept as they are in a token; every other byte becomes `=XX` (upper-case hex).
/// The set is what both NATS subjects and key-value keys allow, minus `.` (the token
/// separator) and `=` (the escape).
fn verbatim(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'/'
}

/// The longest subject token (an escaped topic, type or cache id) a node sends, stores or
/// subscribes to. A server closes a connection whose protocol line is longer than its
/// `max_control_line` (4 KB by default), and the client reconnects to send the same line
/// again: a subject of the prefix, an eid and three such tokens stays well under it.
pub(crate) const MAX_TOKEN: usize = 1024;

/// `name` makes a subject token a server takes: not empty (a key may not end with the
/// separator) and no longer than `MAX_TOKEN` once escaped.
pub(crate) fn token_fits(name: &str) -> bool {
    let escaped: usize = name.bytes().map(|b| if verbatim(b) { 1 } else { 3 }).sum();
    escaped > 0 && escaped <= MAX_TOKEN
}

/// Escapes a name (topic, type, cache id) into one subject / key token.
pub fn escape_token(name: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in name.as_bytes() {
        if verbatim(b) {
            out.push(b as char);
        } else {
            out.push('=');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
    }
}

pub fn escaped(name: &str) -> String {
    let mut s = String::with_capacity(name.len() + 8);
    escape_token(name, &mut s);
    s
}

/// Reverses [`escape_token`]. Refuses anything `escape_token` cannot produce. A token
/// with nothing escaped (most names) is returned as it is, without a copy.
pub fn unescape_token(token: &str) -> Result<Cow<'_, str>, WireError> {
    let b = token.as_bytes();
    if b.is_empty() {
        return Err(WireError::BadToken);
    }
    if b.iter().all(|&c| verbatim(c)) {
        return Ok(Cow::Borrowed(token));
    }
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'=' {
            let hex = b.get(i + 1..i + 3).ok_or(WireError::BadToken)?;
            let v = hex_pair(hex).ok_or(WireError::BadToken)?;
            if verbatim(v) {
                return Err(WireError::BadToken); // not canonical
            }
            out.push(v);
            i += 3;
        } else if verbatim(b[i]) {
            out.push(b[i]);
            i += 1;
        } else {
            return Err(WireError::BadToken);
        }
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| WireError::BadName)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn hex_pair(h: &[u8]) -> Option<u8> {
    Some(hex_digit(h[0])? << 4 | hex_digit(h[1])?)
}

/// An eid as a subject / key token: 12 lower-case hex digits.
pub fn eid_token(eid: &Eid) -> String {
    eid.bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn parse_eid_token(t: &str) -> Result<Eid, WireError> {
    let b = t.as_bytes();
    if b.len() != 12 {
        return Err(WireError::BadToken);
    }
    let mut eid = Eid::default();
    for (i, byte) in eid.bytes.iter_mut().enumerate() {
        let pair = [
            b[2 * i].to_ascii_uppercase(),
            b[2 * i + 1].to_ascii_uppercase(),
        ];
        *byte = hex_pair(&pair).ok_or(WireError::BadToken)?;
    }
    Ok(eid)
}

/// The envelope in front of every message body and stored snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope {
    pub flags: u8,
    pub eid: Eid,
    /// The sending process's session (random per join).
    pub session: u32,
    /// Per session, +1 for each message sent (subjects `m` and `d`); 0 in stored values.
    pub seq: u64,
    /// The message's own timestamp (CLOCK_REALTIME ns, the sender's clock).
    pub timestamp_ns: u64,
}

impl Envelope {
    /// Appends the 28-byte header: version, flags, eid, session (LE u32), seq (LE u64),
    /// timestamp (LE u64).
    pub fn write(&self, out: &mut Vec<u8>) {
        out.push(VERSION);
        out.push(self.flags);
        out.extend_from_slice(&self.eid.bytes);
        out.extend_from_slice(&self.session.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.timestamp_ns.to_le_bytes());
    }

    /// Splits a body into its envelope and payload.
    pub fn read(body: &[u8]) -> Result<(Envelope, &[u8]), WireError> {
        if body.len() < ENVELOPE_LEN {
            return Err(WireError::TooShort);
        }
        if body[0] != VERSION {
            return Err(WireError::BadVersion);
        }
        let flags = body[1];
        if flags & !KNOWN_FLAGS != 0 {
            return Err(WireError::BadFlags);
        }
        let mut eid = Eid::default();
        eid.bytes.copy_from_slice(&body[2..8]);
        let env = Envelope {
            flags,
            eid,
            session: u32::from_le_bytes(body[8..12].try_into().expect("4 bytes")),
            seq: u64::from_le_bytes(body[12..20].try_into().expect("8 bytes")),
            timestamp_ns: u64::from_le_bytes(body[20..28].try_into().expect("8 bytes")),
        };
        Ok((env, &body[ENVELOPE_LEN..]))
    }
}

/// Node states on the wire (and in `sb_node_state`).
pub(crate) const NODE_UP: u8 = 1;
pub(crate) const NODE_LEFT: u8 = 3;

/// A heartbeat (subject `P.hb`) and a presence record (key `<eid>.n`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// NODE_UP, or NODE_LEFT for a leave announcement.
    pub state: u8,
    pub eid: Eid,
    pub session: u32,
    pub heartbeat_ms: u32,
    /// When the node last finished writing all of its snapshots to the store (its clock,
    /// ns); changes tell the others to re-read them.
    pub asserted_ns: u64,
    pub name: String,
    /// How far the node's store writes got (absent in a presence record written by an
    /// older node, whose heartbeats end with the name).
    pub store: Option<StoreMarks>,
}

/// Two counts of a node's store writes of its cache changes (since its session began):
/// `queued` were made, and the first `stored` of them are behind it (confirmed by the
/// store, or given up and left to a re-assertion). A node that dropped arrivals waits
/// until a sender's `stored` reaches the `queued` it reported after the drop before it
/// re-reads that sender's snapshots (`catch_up`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreMarks {
    pub queued: u64,
    pub stored: u64,
}

/// Longest node name carried.
pub(crate) const MAX_NAME: usize = 255;

impl Heartbeat {
    /// version, state, eid, session (LE u32), heartbeat_ms (LE u32), asserted_ns (LE u64),
    /// name length (u8), name (UTF-8), then the store marks if known: queued (LE u64),
    /// stored (LE u64). A decoder takes what follows the name as marks when there are 16
    /// bytes or more, and ignores anything beyond (room for later fields).
    pub fn encode(&self) -> Vec<u8> {
        let name = truncate_utf8(&self.name, MAX_NAME);
        let mut out = Vec::with_capacity(29 + name.len() + 16);
        out.push(VERSION);
        out.push(self.state);
        out.extend_from_slice(&self.eid.bytes);
        out.extend_from_slice(&self.session.to_le_bytes());
        out.extend_from_slice(&self.heartbeat_ms.to_le_bytes());
        out.extend_from_slice(&self.asserted_ns.to_le_bytes());
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        if let Some(m) = self.store {
            out.extend_from_slice(&m.queued.to_le_bytes());
            out.extend_from_slice(&m.stored.to_le_bytes());
        }
        out
    }

    pub fn decode(b: &[u8]) -> Result<Heartbeat, WireError> {
        if b.len() < 25 {
            return Err(WireError::TooShort);
        }
        if b[0] != VERSION {
            return Err(WireError::BadVersion);
        }
        let state = b[1];
        if state != NODE_UP && state != NODE_LEFT {
            return Err(WireError::BadFlags);
        }
        let mut eid = Eid::default();
        eid.bytes.copy_from_slice(&b[2..8]);
        let name_len = b[24] as usize;
        let name = b.get(25..25 + name_len).ok_or(WireError::TooShort)?;
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let marks_at = 25 + name_len;
        let store = (b.len() >= marks_at + 16).then(|| StoreMarks {
            queued: u64_at(marks_at),
            stored: u64_at(marks_at + 8),
        });
        let heartbeat_ms = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes"));
        if heartbeat_ms == 0 {
            return Err(WireError::BadFlags);
        }
        Ok(Heartbeat {
            state,
            eid,
            session: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            heartbeat_ms,
            asserted_ns: u64_at(16),
            name: std::str::from_utf8(name)
                .map_err(|_| WireError::BadName)?
                .to_owned(),
            store,
        })
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut n = s.len().min(max);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s[..n]
}

/// What a message subject addresses (names borrowed from the subject when nothing in
/// them was escaped).
#[derive(Debug, PartialEq, Eq)]
pub struct Address<'a> {
    /// Set for `P.d.<eid>...` (the addressee).
    pub to: Option<Eid>,
    pub topic: Cow<'a, str>,
    pub type_name: Cow<'a, str>,
}

/// Parses the part of a message subject after `P.`: `m.<topic>.<type>` or
/// `d.<eid>.<topic>.<type>`.
pub fn parse_message_subject(rest: &str) -> Result<Address<'_>, WireError> {
    let mut parts = rest.split('.');
    let kind = parts.next().ok_or(WireError::BadSubject)?;
    let to = match kind {
        "m" => None,
        "d" => Some(parse_eid_token(parts.next().ok_or(WireError::BadSubject)?)?),
        _ => return Err(WireError::BadSubject),
    };
    let topic = unescape_token(parts.next().ok_or(WireError::BadSubject)?)?;
    let type_name = unescape_token(parts.next().ok_or(WireError::BadSubject)?)?;
    if parts.next().is_some() {
        return Err(WireError::BadSubject);
    }
    Ok(Address {
        to,
        topic,
        type_name,
    })
}

/// A stored snapshot's key, parsed: `<eid>.c.<topic>.<type>.<id>`.
#[derive(Debug, PartialEq, Eq)]
pub struct SnapshotKey {
    pub eid: Eid,
    pub topic: String,
    pub type_name: String,
    pub id: String,
}

pub fn snapshot_key(eid: &Eid, topic_token: &str, type_name: &str, id: &str) -> String {
    let mut k = eid_token(eid);
    k.push_str(".c.");
    k.push_str(topic_token);
    k.push('.');
    escape_token(type_name, &mut k);
    k.push('.');
    escape_token(id, &mut k);
    k
}

pub fn presence_key(eid: &Eid) -> String {
    format!("{}.n", eid_token(eid))
}

pub fn parse_snapshot_key(key: &str) -> Result<SnapshotKey, WireError> {
    let mut parts = key.split('.');
    let eid = parse_eid_token(parts.next().ok_or(WireError::BadSubject)?)?;
    if parts.next() != Some("c") {
        return Err(WireError::BadSubject);
    }
    let topic = unescape_token(parts.next().ok_or(WireError::BadSubject)?)?.into_owned();
    let type_name = unescape_token(parts.next().ok_or(WireError::BadSubject)?)?.into_owned();
    let id = unescape_token(parts.next().ok_or(WireError::BadSubject)?)?.into_owned();
    if parts.next().is_some() {
        return Err(WireError::BadSubject);
    }
    Ok(SnapshotKey {
        eid,
        topic,
        type_name,
        id,
    })
}

/// Parses a presence key `<eid>.n`.
pub fn parse_presence_key(key: &str) -> Option<Eid> {
    let t = key.strip_suffix(".n")?;
    parse_eid_token(t).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_fit_when_not_empty_and_short_once_escaped() {
        assert!(!token_fits(""));
        assert!(token_fits("a"));
        assert!(token_fits(&"a".repeat(MAX_TOKEN)));
        assert!(!token_fits(&"a".repeat(MAX_TOKEN + 1)));
        // ':' is escaped to three bytes
        assert!(token_fits(&":".repeat(MAX_TOKEN / 3)));
        assert!(!token_fits(&":".repeat(MAX_TOKEN / 3 + 1)));
        // the longest subject made of such tokens stays under a 4 KB protocol line
        let t = "a".repeat(MAX_TOKEN);
        let key = format!(
            "$KV.{}_state.{}.c.{t}.{t}.{t}",
            "p".repeat(64),
            "0".repeat(12)
        );
        assert!(key.len() + "HPUB  _INBOX.0123456789012345678901.0123456789012345678901 1000000000 1000000000\r\n".len() < 4096);
    }

    #[test]
    fn tokens_round_trip_and_stay_single_tokens() {
        for name in [
            "devicestate:all",
            "a.b",
            "x y*>",
            "=",
            "ünï",
            "plain-name_1/2",
            "%",
        ] {
            let t = escaped(name);
            assert!(!t.contains('.') && !t.contains('*') && !t.contains('>') && !t.contains(' '));
            assert_eq!(unescape_token(&t).unwrap(), name);
        }
        assert_eq!(escaped("devicestate:all"), "devicestate=3Aall");
        // Nothing escaped: the token itself, not a copy.
        assert!(matches!(
            unescape_token("reg_1-a/b"),
            Ok(Cow::Borrowed("reg_1-a/b"))
        ));
        assert!(matches!(unescape_token("a=3Ab"), Ok(Cow::Owned(o)) if o == "a:b"));
        assert_eq!(unescape_token(""), Err(WireError::BadToken));
        assert_eq!(unescape_token("=4"), Err(WireError::BadToken));
        assert_eq!(unescape_token("=41"), Err(WireError::BadToken)); // 'A' is verbatim
        assert_eq!(unescape_token("a:b"), Err(WireError::BadToken));
        assert_eq!(unescape_token("=FF"), Err(WireError::BadName));
    }

    #[test]
    fn envelope_round_trips() {
        let env = Envelope {
            flags: FLAG_BYTES,
            eid: Eid {
                bytes: [1, 2, 3, 4, 5, 6],
            },
            session: 0xdead_beef,
            seq: 42,
            timestamp_ns: 1_700_000_000_000_000_000,
        };
        let mut body = Vec::new();
        env.write(&mut body);
        assert_eq!(body.len(), ENVELOPE_LEN);
        body.extend_from_slice(b"payload");
        let (back, payload) = Envelope::read(&body).unwrap();
        assert_eq!(back, env);
        assert_eq!(payload, b"payload");
        assert_eq!(Envelope::read(&body[..27]), Err(WireError::TooShort));
        body[1] = 0x80;
        assert_eq!(Envelope::read(&body), Err(WireError::BadFlags));
        body[0] = 9;
        assert_eq!(Envelope::read(&body), Err(WireError::BadVersion));
    }

    #[test]
    fn heartbeat_round_trips() {
        let hb = Heartbeat {
            state: NODE_UP,
            eid: Eid {
                bytes: [0xaa, 0, 0, 0, 0, 1],
            },
            session: 7,
            heartbeat_ms: 1000,
            asserted_ns: 99,
            name: "pbx-1".into(),
            store: Some(StoreMarks {
                queued: 1 << 40,
                stored: 12,
            }),
        };
        let b = hb.encode();
        assert_eq!(Heartbeat::decode(&b).unwrap(), hb);
        // Fields added later after the marks are ignored.
        let mut longer = b.clone();
        longer.extend_from_slice(b"later");
        assert_eq!(Heartbeat::decode(&longer).unwrap(), hb);
        // An older node's heartbeat ends with the name: no marks, and a partial mark
        // field is not read as one.
        let old = Heartbeat { store: None, ..hb };
        let ob = old.encode();
        assert_eq!(ob.len(), b.len() - 16);
        assert_eq!(Heartbeat::decode(&ob).unwrap(), old);
        assert_eq!(Heartbeat::decode(&b[..b.len() - 1]).unwrap(), old);
        let name_cut = ob.len() - 1;
        assert!(Heartbeat::decode(&ob[..name_cut]).is_err());
    }

    #[test]
    fn subjects_and_keys_parse() {
        let eid = Eid {
            bytes: [0xaa, 0xbb, 0xcc, 0, 1, 2],
        };
        assert_eq!(eid_token(&eid), "aabbcc000102");
        assert_eq!(parse_eid_token("AABBCC000102").unwrap(), eid);
        let a = parse_message_subject("m.devicestate=3Aall.endpoint").unwrap();
        assert_eq!(a.topic, "devicestate:all");
        assert_eq!(a.type_name, "endpoint");
        assert_eq!(a.to, None);
        let d = parse_message_subject("d.aabbcc000102.t.ty").unwrap();
        assert_eq!(d.to, Some(eid));
        assert!(parse_message_subject("m.t").is_err());
        assert!(parse_message_subject("m.t.ty.extra").is_err());
        assert!(parse_message_subject("x.t.ty").is_err());
        let k = snapshot_key(&eid, &escaped("reg"), "contact", "alice@example.com");
        let p = parse_snapshot_key(&k).unwrap();
        assert_eq!(
            (p.eid, p.topic.as_str(), p.type_name.as_str(), p.id.as_str()),
            (eid, "reg", "contact", "alice@example.com")
        );
        assert_eq!(parse_presence_key(&presence_key(&eid)), Some(eid));
    }
}
