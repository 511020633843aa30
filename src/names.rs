//! Validation of the names C callers give us (types, topics, pool entries).

use crate::error::{Error, Result};

/// Longest accepted name in bytes. Telephony names are short ("endpoint:all/PJSIP/alice");
/// a megabyte-long name is a bug in the caller and gets a clear error instead of a copy.
pub(crate) const MAX_NAME_LEN: usize = 4096;

pub fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(format!("{what} name is empty")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(format!(
            "{what} name is {} bytes long; the limit is {MAX_NAME_LEN}",
            name.len()
        )));
    }
    if name.contains('\0') {
        return Err(Error::invalid(format!("{what} name contains a NUL byte")));
    }
    Ok(())
}
