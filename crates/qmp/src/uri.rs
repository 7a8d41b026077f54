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

/// First words that only a shell understands: reserved words and builtins that are not also
/// programs on disk.
const SHELL_WORDS: &[&str] = &[
    "!", "{", "}", "case", "do", "done", "elif", "else", "esac", "fi", "for", "if", "in", "then",
    "until", "while", ".", ":", "alias", "break", "cd", "command", "continue", "eval", "exec",
    "exit", "export", "readonly", "return", "set", "shift", "source", "times", "trap", "ulimit",
    "umask", "unset", "wait",
];

/// Splits the command of an `exec:` URI into an argv list the way a POSIX shell splits a simple
/// command, for the typed `exec` transport (which runs `args` without a shell).
///
/// The rules: blanks separate words; `'...'` quotes literally; `"..."` quotes, with `\`
/// escaping `\`, `"`, `$` and `` ` ``; a `\` outside quotes escapes the next character.
/// Returns `None` when the command needs a real shell to mean what it says, and the caller
/// should run it with `/bin/sh -c` as QEMU's `exec:` URI does: unquoted operators, redirections
/// or expansions (``| & ; < > ( ) $ ` * ? [``, a leading `~` or `#`), `$` or `` ` `` inside
/// double quotes, a leading `NAME=value`, a reserved word or shell builtin as the first word,
/// unbalanced quotes, or no words at all.
pub fn split_command(command: &str) -> Option<Vec<String>> {
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    // A word may be empty ("") but still a word; `started` tells it from no word at all.
    let mut started = false;
    let mut quoted = false;
    let mut chars = command.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => {
                if started {
                    words.push(std::mem::take(&mut word));
                    started = false;
                    quoted = false;
                }
            }
            '\'' => {
                started = true;
                quoted = true;
                loop {
                    match chars.next()? {
                        '\'' => break,
                        ch => word.push(ch),
                    }
                }
            }
            '"' => {
                started = true;
                quoted = true;
                loop {
                    match chars.next()? {
                        '"' => break,
                        '$' | '`' => return None,
                        '\\' => match chars.next()? {
                            ch @ ('\\' | '"' | '$' | '`') => word.push(ch),
                            '\n' => {}
                            ch => {
                                word.push('\\');
                                word.push(ch);
                            }
                        },
                        ch => word.push(ch),
                    }
                }
            }
            '\\' => match chars.next()? {
                '\n' => {}
                ch => {
                    started = true;
                    quoted = true;
                    word.push(ch);
                }
            },
            '|' | '&' | ';' | '<' | '>' | '(' | ')' | '$' | '`' | '*' | '?' | '[' => return None,
            '#' | '~' if !started => return None,
            '=' if words.is_empty() && !quoted && is_name(&word) => return None,
            ch => {
                started = true;
                word.push(ch);
            }
        }
    }
    if started {
        words.push(word);
    }
    match words.first() {
        None => None,
        Some(first) if SHELL_WORDS.contains(&first.as_str()) => None,
        Some(_) => Some(words),
    }
}

/// A shell variable name: what makes `NAME=value cmd` an assignment.
fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
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

#[cfg(test)]
mod tests {
    use super::split_command;

    fn split(s: &str) -> Option<Vec<String>> {
        split_command(s)
    }

    fn words(w: &[&str]) -> Option<Vec<String>> {
        Some(w.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn simple_commands_split_into_words() {
        assert_eq!(
            split("zstd -q -o /var/lib/vm/state.zst"),
            words(&["zstd", "-q", "-o", "/var/lib/vm/state.zst"])
        );
        assert_eq!(split("  gzip\t-dc   f  "), words(&["gzip", "-dc", "f"]));
        assert_eq!(
            split("cat '/a b/c' \"d \\\"e\\\"\" f\\ g \"\""),
            words(&["cat", "/a b/c", "d \"e\"", "f g", ""])
        );
        assert_eq!(split("cmd --opt=x"), words(&["cmd", "--opt=x"]));
        assert_eq!(split("/usr/bin/x=y"), words(&["/usr/bin/x=y"]));
        assert_eq!(split("cmd a~b c#d"), words(&["cmd", "a~b", "c#d"]));
        assert_eq!(split("cmd '$HOME' 'a|b'"), words(&["cmd", "$HOME", "a|b"]));
    }

    #[test]
    fn shell_syntax_needs_a_shell() {
        for cmd in [
            "gzip -c > /tmp/f",
            "cat f | zstd",
            "a; b",
            "a && b",
            "cmd $HOME",
            "cmd \"$HOME\"",
            "cmd `x`",
            "cmd *.bin",
            "cmd ~/f",
            "FOO=1 cmd",
            "exec cat",
            "if true",
            "cmd 'unbalanced",
            "cmd \"unbalanced",
            "",
            "   ",
            "# comment",
        ] {
            assert_eq!(split_command(cmd), None, "{cmd:?}");
        }
    }
}
