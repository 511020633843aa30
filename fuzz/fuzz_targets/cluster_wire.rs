//! Fuzzes what arrives from the network in cluster mode: message subjects and bodies,
//! stored snapshots (key and value) and heartbeats, through the real delivery path of a
//! node that shares topic "t" with a cache (`switchboard::cluster::offline`), the topic
//! unshared and shared again in between (what the delivery keeps per subject). Nothing
//! may crash, hang or leak; every arrival is delivered, ignored or counted as dropped.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use switchboard::cluster::offline::{body, deliver, Arrival};

#[derive(Arbitrary, Debug)]
enum Input {
    /// A raw subject and body.
    Raw { subject: String, body: Vec<u8> },
    /// A well-formed envelope around a payload, on a chosen subject shape.
    Framed {
        shape: u8,
        type_name: String,
        eid: [u8; 6],
        session: u32,
        seq: u64,
        flags: u8,
        payload: Vec<u8>,
    },
    Stored { key: String, value: Vec<u8> },
    Heartbeat { body: Vec<u8> },
    Shared { on: bool },
}

fuzz_target!(|inputs: Vec<Input>| {
    let inputs = &inputs[..inputs.len().min(64)];
    let mut owned: Vec<(String, Vec<u8>, u8)> = Vec::new();
    for i in inputs {
        match i {
            Input::Raw { subject, body } => owned.push((subject.clone(), body.clone(), 0)),
            Input::Framed { shape, type_name, eid, session, seq, flags, payload } => {
                let subject = match shape % 4 {
                    0 => format!("m.t.{type_name}"),
                    1 => "m.t.offline-codec".to_owned(),
                    2 => format!("d.fe0000000001.t.{type_name}"),
                    _ => "m.t.bytes".to_owned(),
                };
                owned.push((subject, body(*eid, *session, *seq, *flags & 3, payload), 0));
            }
            Input::Stored { key, value } => owned.push((key.clone(), value.clone(), 1)),
            Input::Heartbeat { body } => owned.push((String::new(), body.clone(), 2)),
            Input::Shared { on } => owned.push((String::new(), Vec::new(), 3 + u8::from(*on))),
        }
    }
    let arrivals: Vec<Arrival<'_>> = owned
        .iter()
        .map(|(s, b, kind)| match kind {
            0 => Arrival::Message { subject: s, body: b },
            1 => Arrival::Stored { key: s, value: b },
            2 => Arrival::Heartbeat { body: b },
            on => Arrival::Shared { on: *on == 4 },
        })
        .collect();
    let out = deliver(&arrivals);
    assert!(out.received + out.dropped_in <= arrivals.len() as u64 * 2);
});
