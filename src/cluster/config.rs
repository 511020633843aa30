//! Cluster configuration: string keys and values, as librdkafka does, so a new key never
//! changes the ABI. Every value is checked when it is set; `validate` checks what only
//! makes sense as a whole (servers given, a password with its user...).

use crate::error::{Error, Result};

/// Largest `out_queue_limit`.
pub(crate) const MAX_OUT_QUEUE_LIMIT: u64 = 10_000_000;

#[derive(Clone, Debug)]
pub struct Config {
    pub servers: Vec<String>,
    pub prefix: String,
    pub node_name: String,
    pub heartbeat_ms: u32,
    pub down_after_missed: u32,
    pub connect_timeout_ms: u32,
    pub out_queue_limit: usize,
    /// Replicas of the key-value bucket (3 on a three-server cluster survives one loss).
    pub store_replicas: usize,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub creds_file: Option<String>,
    pub tls_ca_file: Option<String>,
    pub tls_cert_file: Option<String>,
    pub tls_key_file: Option<String>,
    pub tls_required: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            servers: Vec::new(),
            prefix: "sb".into(),
            node_name: host_name(),
            heartbeat_ms: 1000,
            down_after_missed: 3,
            connect_timeout_ms: 5000,
            out_queue_limit: 100_000,
            store_replicas: 1,
            user: None,
            password: None,
            token: None,
            creds_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_required: false,
        }
    }
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its length; gethostname NUL-terminates within it or
    // truncates, and we stop at the first NUL or the end.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "node".into();
    }
    let n = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn bad(key: &str, value: &str, why: &str) -> Error {
    Error::invalid(format!("cluster config '{key}' = '{value}': {why}"))
}

fn number(key: &str, value: &str, min: u64, max: u64) -> Result<u64> {
    let n: u64 = value
        .trim()
        .parse()
        .map_err(|_| bad(key, value, "not a number"))?;
    if n < min || n > max {
        return Err(bad(key, value, &format!("must be {min}..{max}")));
    }
    Ok(n)
}

/// One server URL: `nats://host:port` or `tls://host:port` (port optional).
fn check_server(key: &str, url: &str) -> Result<String> {
    let url = url.trim();
    let rest = url
        .strip_prefix("nats://")
        .or_else(|| url.strip_prefix("tls://"))
        .ok_or_else(|| bad(key, url, "a server URL starts with nats:// or tls://"))?;
    let hostport = rest.rsplit('@').next().unwrap_or(rest);
    if hostport.is_empty() || hostport.contains('/') || hostport.contains(' ') {
        return Err(bad(key, url, "want nats://host:port"));
    }
    if let Some((_, port)) = hostport.rsplit_once(':') {
        if !hostport.ends_with(']') && port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(bad(key, url, "bad port"));
        }
    }
    Ok(url.to_owned())
}

fn text(key: &str, value: &str) -> Result<Option<String>> {
    if value.is_empty() {
        return Ok(None); // "" unsets
    }
    if value.len() > 4096 {
        return Err(bad(key, "...", "longer than 4096 bytes"));
    }
    Ok(Some(value.to_owned()))
}

impl Config {
    /// Sets `key` to `value` (a key set before is overwritten).
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        match key {
            "servers" => {
                let list = value
                    .split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| check_server(key, s))
                    .collect::<Result<Vec<_>>>()?;
                if list.is_empty() {
                    return Err(bad(key, value, "no server URL"));
                }
                self.servers = list;
            }
            "prefix" => {
                let ok = !value.is_empty()
                    && value.len() <= 64
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if !ok {
                    return Err(bad(key, value, "1-64 of A-Z a-z 0-9 _ -"));
                }
                self.prefix = value.into();
            }
            "node_name" => {
                if value.is_empty() || value.len() > super::wire::MAX_NAME {
                    return Err(bad(key, value, "1-255 bytes"));
                }
                self.node_name = value.into();
            }
            "heartbeat_ms" => self.heartbeat_ms = number(key, value, 10, 3_600_000)? as u32,
            "down_after_missed" => self.down_after_missed = number(key, value, 1, 1000)? as u32,
            "connect_timeout_ms" => {
                self.connect_timeout_ms = number(key, value, 1, 3_600_000)? as u32
            }
            // The queue's room is allocated at join, all of it (about 50 bytes a message):
            // a bound an allocation can still be expected to get, not one that aborts.
            "out_queue_limit" => {
                self.out_queue_limit = number(key, value, 1, MAX_OUT_QUEUE_LIMIT)? as usize
            }
            "store_replicas" => self.store_replicas = number(key, value, 1, 5)? as usize,
            "user" => self.user = text(key, value)?,
            "password" => self.password = text(key, value)?,
            "token" => self.token = text(key, value)?,
            "creds_file" => self.creds_file = text(key, value)?,
            "tls_ca_file" => self.tls_ca_file = text(key, value)?,
            "tls_cert_file" => self.tls_cert_file = text(key, value)?,
            "tls_key_file" => self.tls_key_file = text(key, value)?,
            "tls_required" => {
                self.tls_required = match value {
                    "0" | "false" => false,
                    "1" | "true" => true,
                    _ => return Err(bad(key, value, "0 or 1")),
                }
            }
            _ => {
                return Err(Error::invalid(format!(
                    "unknown cluster config key '{key}'"
                )))
            }
        }
        Ok(())
    }

    /// Checks the configuration as a whole, before joining.
    pub fn validate(&self) -> Result<()> {
        if self.servers.is_empty() {
            return Err(Error::invalid("cluster config: 'servers' is required"));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(Error::invalid(
                "cluster config: 'user' and 'password' go together",
            ));
        }
        let methods = [
            self.user.is_some(),
            self.token.is_some(),
            self.creds_file.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(Error::invalid(
                "cluster config: use one of user/password, token, creds_file",
            ));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(Error::invalid(
                "cluster config: 'tls_cert_file' and 'tls_key_file' go together",
            ));
        }
        for (key, file) in [
            ("creds_file", &self.creds_file),
            ("tls_ca_file", &self.tls_ca_file),
            ("tls_cert_file", &self.tls_cert_file),
            ("tls_key_file", &self.tls_key_file),
        ] {
            if let Some(f) = file {
                if let Err(e) = std::fs::metadata(f) {
                    return Err(bad(key, f, &format!("cannot read it: {e}")));
                }
            }
        }
        Ok(())
    }

    /// Whether TLS is asked for by any setting.
    pub fn wants_tls(&self) -> bool {
        self.tls_required
            || self.tls_ca_file.is_some()
            || self.tls_cert_file.is_some()
            || self.servers.iter().any(|s| s.starts_with("tls://"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        let mut c = Config::default();
        assert!(c.set("servers", "nats://127.0.0.1:4222, tls://h:1").is_ok());
        assert_eq!(c.servers.len(), 2);
        assert!(c.set("servers", "http://x").is_err());
        assert!(c.set("servers", "nats://h:0").is_err());
        assert!(c.set("servers", "").is_err());
        assert!(c.set("prefix", "a.b").is_err());
        assert!(c.set("heartbeat_ms", "5").is_err());
        assert!(c.set("heartbeat_ms", "x").is_err());
        assert!(c.set("heartbeat_ms", "100").is_ok());
        assert_eq!(c.heartbeat_ms, 100);
        let e = c.set("no_such_key", "1").unwrap_err();
        assert!(e.message.contains("no_such_key"));
        assert!(c.set("tls_required", "2").is_err());
        assert!(c.validate().is_ok());
        c.set("user", "u").unwrap();
        assert!(c.validate().is_err());
        c.set("password", "p").unwrap();
        assert!(c.validate().is_ok());
        c.set("token", "t").unwrap();
        assert!(c.validate().is_err());
    }
}
