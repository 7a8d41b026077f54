//! QEMU's legacy migration URIs (`tcp:h:p`, `unix:/p`, `exec:cmd`, `file:/p,offset=N`, ...)
//! both ways, as `migration/migration.c` (`migrate_uri_parse`) reads them.

use std::fmt;
use std::str::FromStr;

use crate::models::{InetSocketAddress, MigrationAddress, SocketAddress};

/// A migration URI that QEMU would not accept; the message names the input and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid migration URI {uri:?}: {reason}")]
pub struct UriError {
    /// The URI as given.
    pub uri: String,
    /// What is wrong with it.
    pub reason: String,
}

fn err(uri: &str, reason: impl Into<String>) -> UriError {
    UriError {
        uri: uri.to_string(),
        reason: reason.into(),
    }
}

/// `host:port` or `[v6host]:port`, optionally followed by `,opt[=val]` knobs.
fn parse_inet(uri: &str, spec: &str) -> Result<InetSocketAddress, UriError> {
    let (hostport, opts) = match spec.split_once(',') {
        Some((hp, o)) => (hp, Some(o)),
        None => (spec, None),
    };
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| err(uri, "missing ']' after the IPv6 address"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| err(uri, "expected ':port' after ']'"))?;
        (host, port)
    } else {
        hostport
            .rsplit_once(':')
            .ok_or_else(|| err(uri, "expected host:port"))?
    };
    if !hostport.starts_with('[') && host.contains(':') {
        return Err(err(
            uri,
            "an IPv6 address must be written in brackets: [addr]:port",
        ));
    }
    if port.is_empty() {
        return Err(err(uri, "missing port"));
    }
    let mut addr = InetSocketAddress::new(host, port);
    for opt in opts.into_iter().flat_map(|o| o.split(',')) {
        let (key, val) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        let flag = || match val {
            None | Some("on") => Ok(Some(true)),
            Some("off") => Ok(Some(false)),
            Some(v) => Err(err(
                uri,
                format!("option {key}: expected on or off, got {v:?}"),
            )),
        };
        match key {
            "to" => {
                let v = val.ok_or_else(|| err(uri, "option to needs a port: to=N"))?;
                addr.to = Some(
                    v.parse()
                        .map_err(|_| err(uri, format!("option to: {v:?} is not a port")))?,
                );
            }
            "ipv4" => addr.ipv4 = flag()?,
            "ipv6" => addr.ipv6 = flag()?,
            "numeric" => addr.numeric = flag()?,
            "keep-alive" => addr.keep_alive = flag()?,
            "mptcp" => addr.mptcp = flag()?,
            _ => return Err(err(uri, format!("unknown option {key:?}"))),
        }
    }
    Ok(addr)
}

fn print_inet(a: &InetSocketAddress) -> String {
    let mut s = if a.host.contains(':') {
        format!("[{}]:{}", a.host, a.port)
    } else {
        format!("{}:{}", a.host, a.port)
    };
    let flags = [
        ("numeric", a.numeric),
        ("ipv4", a.ipv4),
        ("ipv6", a.ipv6),
        ("keep-alive", a.keep_alive),
        ("mptcp", a.mptcp),
    ];
    if let Some(to) = a.to {
        s.push_str(&format!(",to={to}"));
    }
    for (name, v) in flags {
        match v {
            Some(true) => s.push_str(&format!(",{name}=on")),
            Some(false) => s.push_str(&format!(",{name}=off")),
            None => {}
        }
    }
    s
}

/// A number as QEMU's `qemu_strtou64(.., base 0)` reads it: decimal or `0x` hex.
fn parse_u64(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') {
        u64::from_str_radix(&s[1..], 8).ok()
    } else {
        s.parse().ok()
    }
}

impl MigrationAddress {
    /// Parses a legacy migration URI: `unix:/path`, `tcp:host:port` (`tcp:[::1]:port`),
    /// `exec:command` (run by `/bin/sh -c`, as QEMU does), `file:/path[,offset=N]`,
    /// `rdma:host:port`, `vsock:cid:port`, `fd:name`.
    pub fn parse_uri(s: &str) -> Result<Self, UriError> {
        let (scheme, rest) = s.split_once(':').ok_or_else(|| {
            err(
                s,
                "expected scheme:address, e.g. unix:/path or tcp:host:port",
            )
        })?;
        let nonempty = |what: &str| {
            if rest.is_empty() {
                Err(err(s, format!("missing {what}")))
            } else {
                Ok(rest.to_string())
            }
        };
        Ok(match scheme {
            "unix" => MigrationAddress::Socket(SocketAddress::Unix {
                path: nonempty("socket path")?,
            }),
            "tcp" => MigrationAddress::Socket(SocketAddress::Inet(parse_inet(s, rest)?)),
            "rdma" => MigrationAddress::Rdma(parse_inet(s, rest)?),
            "vsock" => {
                let (cid, port) = rest
                    .split_once(':')
                    .ok_or_else(|| err(s, "expected vsock:cid:port"))?;
                if cid.is_empty() || port.is_empty() {
                    return Err(err(s, "expected vsock:cid:port"));
                }
                MigrationAddress::Socket(SocketAddress::Vsock {
                    cid: cid.to_string(),
                    port: port.to_string(),
                })
            }
            "fd" => MigrationAddress::Socket(SocketAddress::Fd {
                str: nonempty("fd name")?,
            }),
            "exec" => MigrationAddress::Exec {
                args: vec!["/bin/sh".into(), "-c".into(), nonempty("command")?],
            },
            "file" => {
                let (filename, offset) = match rest.rsplit_once(',') {
                    Some((f, opt)) => {
                        let v = opt.strip_prefix("offset=").ok_or_else(|| {
                            err(s, format!("unknown file option {opt:?} (only offset=N)"))
                        })?;
                        let off = parse_u64(v)
                            .ok_or_else(|| err(s, format!("offset {v:?} is not a number")))?;
                        (f, off)
                    }
                    None => (rest, 0),
                };
                if filename.is_empty() {
                    return Err(err(s, "missing file name"));
                }
                MigrationAddress::File {
                    filename: filename.to_string(),
                    offset,
                }
            }
            other => {
                return Err(err(
                    s,
                    format!(
                    "unknown scheme {other:?} (expected unix, tcp, exec, file, rdma, vsock or fd)"
                ),
                ))
            }
        })
    }

    /// The legacy URI for this address, for QEMUs without `channels`. `exec` args other than
    /// `["/bin/sh", "-c", cmd]` are joined with spaces (QEMU runs the URI through a shell).
    pub fn to_uri(&self) -> String {
        match self {
            MigrationAddress::Socket(SocketAddress::Inet(a)) => format!("tcp:{}", print_inet(a)),
            MigrationAddress::Socket(SocketAddress::Unix { path }) => format!("unix:{path}"),
            MigrationAddress::Socket(SocketAddress::Vsock { cid, port }) => {
                format!("vsock:{cid}:{port}")
            }
            MigrationAddress::Socket(SocketAddress::Fd { str }) => format!("fd:{str}"),
            MigrationAddress::Socket(SocketAddress::Other) | MigrationAddress::Other => {
                "unknown:".to_string()
            }
            MigrationAddress::Exec { args } => match args.as_slice() {
                [sh, c, cmd] if sh == "/bin/sh" && c == "-c" => format!("exec:{cmd}"),
                _ => format!("exec:{}", args.join(" ")),
            },
            MigrationAddress::Rdma(a) => format!("rdma:{}", print_inet(a)),
            MigrationAddress::File { filename, offset } => {
                if *offset == 0 {
                    format!("file:{filename}")
                } else {
                    format!("file:{filename},offset={offset}")
                }
            }
        }
    }
}

impl FromStr for MigrationAddress {
    type Err = UriError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MigrationAddress::parse_uri(s)
    }
}

impl fmt::Display for MigrationAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_uri())
    }
}
