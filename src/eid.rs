//! Entity ids: which node of a cluster a message comes from.

use crate::error::{Error, Result};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// A 6-byte node id, written "aa:bb:cc:dd:ee:ff".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Eid {
    pub bytes: [u8; 6],
}

/// Bit 48 marks "set"; the low 48 bits hold the eid. One atomic, so readers need no lock.
static DEFAULT_EID: AtomicU64 = AtomicU64::new(0);
const SET_BIT: u64 = 1 << 48;

impl Eid {
    // Byte-array conversions, not shift loops: every message is stamped with the
    // default eid, and the loop cost about 60 instructions per message.
    fn to_u64(self) -> u64 {
        let b = self.bytes;
        u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]])
    }
    fn from_u64(v: u64) -> Eid {
        let b = v.to_be_bytes();
        Eid {
            bytes: [b[2], b[3], b[4], b[5], b[6], b[7]],
        }
    }

    /// This node's id: set by [`Eid::set_default`], else derived once from the host.
    /// Inlined down to one load and a byte swap: every message is stamped with it. The
    /// first call's derivation is out of line, so the common call saves no registers.
    #[inline]
    pub fn default_eid() -> Eid {
        let v = DEFAULT_EID.load(Ordering::Acquire);
        if v & SET_BIT != 0 {
            return Eid::from_u64(v & !SET_BIT);
        }
        Eid::derive_default()
    }

    #[cold]
    #[inline(never)]
    fn derive_default() -> Eid {
        let derived = derive_host_eid();
        match DEFAULT_EID.compare_exchange(
            0,
            derived.to_u64() | SET_BIT,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => derived,
            Err(now) => Eid::from_u64(now & !SET_BIT),
        }
    }

    pub fn set_default(eid: Eid) {
        DEFAULT_EID.store(eid.to_u64() | SET_BIT, Ordering::Release);
    }

    pub fn parse(s: &str) -> Result<Eid> {
        let bad = || Error::invalid(format!("'{s}' is not an eid (want aa:bb:cc:dd:ee:ff)"));
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for b in bytes.iter_mut() {
            let part = parts.next().ok_or_else(bad)?;
            if part.is_empty() || part.len() > 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Eid { bytes })
    }
}

impl fmt::Display for Eid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.bytes;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// A stable id for this host: the first non-zero MAC address, else a hash of the
/// hostname, with the locally-administered bit set so it never collides with a MAC.
fn derive_host_eid() -> Eid {
    if let Ok(dir) = std::fs::read_dir("/sys/class/net") {
        let mut names: Vec<_> = dir.flatten().map(|e| e.file_name()).collect();
        names.sort();
        for name in names {
            let path = format!("/sys/class/net/{}/address", name.to_string_lossy());
            if let Ok(text) = std::fs::read_to_string(path) {
                if let Ok(eid) = Eid::parse(text.trim()) {
                    if eid.bytes != [0; 6] {
                        return eid;
                    }
                }
            }
        }
    }
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in host.trim().bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    let mut eid = Eid::from_u64(h & 0xffff_ffff_ffff);
    eid.bytes[0] = (eid.bytes[0] | 0x02) & 0xfe;
    eid
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn u64_form_round_trips_in_byte_order() {
        let e = Eid {
            bytes: [0x01, 0x23, 0x45, 0x67, 0x89, 0xff],
        };
        assert_eq!(e.to_u64(), 0x0123_4567_89ff);
        assert_eq!(Eid::from_u64(e.to_u64()), e);
        // The set bit (and anything above the 48 bits) is not part of the eid.
        assert_eq!(Eid::from_u64(e.to_u64() | SET_BIT), e);
        assert_eq!(Eid::default().to_u64(), 0);
    }
}
