//! Where a QEMU sends or receives its migration stream, and how it is told.

use std::fmt;
use std::path::PathBuf;

use qmigrate_qmp::probe::MigrationSupport;
use qmigrate_qmp::{MigrationAddress, MigrationTarget, Qmp, SocketAddress};
use tracing::{debug, info};

use crate::exec::{exec_args, shell_quote};
use crate::plan::StreamKind;

/// Where the migration stream goes: the tunnel's Unix socket, a state file, a command, or any
/// other legacy QEMU URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuTarget {
    /// A Unix socket: QEMU listens on it (destination) or connects to it (source).
    Socket(PathBuf),
    /// `file:PATH[,offset=N]`: QEMU writes (save) or reads (restore) the file itself.
    File {
        /// The file, absolute (QEMU's working directory is not ours).
        path: PathBuf,
        /// Where the stream starts in the file.
        offset: u64,
    },
    /// `exec:CMD`: QEMU runs the command and writes the stream to its stdin (save) or reads it
    /// from its stdout (restore).
    Exec(String),
    /// Any other legacy migration URI (`tcp:HOST:PORT`, `unix:PATH`, `fd:NAME`, ...).
    Uri(String),
}

impl fmt::Display for QemuTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QemuTarget::Socket(path) => write!(f, "unix:{}", path.display()),
            QemuTarget::File { path, offset: 0 } => write!(f, "file:{}", path.display()),
            QemuTarget::File { path, offset } => {
                write!(f, "file:{},offset={offset}", path.display())
            }
            QemuTarget::Exec(command) => write!(f, "exec:{command}"),
            QemuTarget::Uri(uri) => f.write_str(uri),
        }
    }
}

/// Which way the stream flows, where a transport differs between the sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `migrate`: the source sends (or saves).
    Outgoing,
    /// `migrate-incoming`: the destination receives (or restores).
    Incoming,
}

impl QemuTarget {
    /// The endpoint for a URI given on the command line: `file:` and `exec:` become
    /// [`QemuTarget::File`] and [`QemuTarget::Exec`] (a relative file name is taken from our working
    /// directory, not QEMU's), anything else stays a URI for QEMU.
    pub fn from_uri(uri: &str) -> QemuTarget {
        match MigrationAddress::parse_uri(uri) {
            Ok(MigrationAddress::File { filename, offset }) => {
                let path = PathBuf::from(filename);
                let path = if path.is_absolute() {
                    path
                } else {
                    std::env::current_dir().map_or(path.clone(), |cwd| cwd.join(&path))
                };
                QemuTarget::File { path, offset }
            }
            Ok(MigrationAddress::Exec { .. }) => match uri.strip_prefix("exec:") {
                Some(command) => QemuTarget::Exec(command.to_owned()),
                None => QemuTarget::Uri(uri.to_owned()),
            },
            _ => QemuTarget::Uri(uri.to_owned()),
        }
    }

    /// What kind of stream this is: a save/restore for `file:` and `exec:`.
    pub fn stream(&self) -> StreamKind {
        match self {
            QemuTarget::File { .. } => StreamKind::File,
            QemuTarget::Exec(_) => StreamKind::Exec,
            QemuTarget::Socket(_) | QemuTarget::Uri(_) => StreamKind::Live,
        }
    }

    /// The typed address, or `None` for a URI our parser does not know (which QEMU may still).
    fn address(&self) -> Option<MigrationAddress> {
        match self {
            QemuTarget::Socket(path) => Some(MigrationAddress::Socket(SocketAddress::Unix {
                path: path.display().to_string(),
            })),
            QemuTarget::File { path, offset } => Some(MigrationAddress::File {
                filename: path.display().to_string(),
                offset: *offset,
            }),
            QemuTarget::Exec(_) => None,
            QemuTarget::Uri(uri) => match MigrationAddress::parse_uri(uri) {
                Ok(address) => Some(address),
                Err(err) => {
                    debug!(%uri, %err, "passing the URI to QEMU as is");
                    None
                }
            },
        }
    }

    /// The argument for `migrate`/`migrate-incoming`: the typed `channels` when this QEMU has
    /// them (8.2+, see [`probe::migration_support`]), the `uri` string otherwise. `direction`
    /// matters only for a file on a QEMU without the file transport. Says at info level how
    /// QEMU is told, for `file:` and `exec:`.
    pub fn target_for(
        &self,
        qmp: &Qmp,
        support: &MigrationSupport,
        direction: Direction,
    ) -> crate::Result<MigrationTarget> {
        let channels = support.channels;
        debug!(use_channels = channels, "migration argument style");
        let version = qmp.greeting().version.qemu;
        match self {
            QemuTarget::File { path, offset } if !channels && !version.at_least(8, 2, 0) => {
                // QEMU before 8.2 has no file transport; `cat` through its exec transport
                // writes and reads the same stream.
                if *offset != 0 {
                    bail!(
                        "QEMU {version} has no file transport (8.2+), and file:PATH,offset=N \
                         cannot be emulated with exec:cat: save without offset"
                    );
                }
                let quoted = shell_quote(&path.display().to_string());
                let uri = match direction {
                    Direction::Outgoing => format!("exec:cat > {quoted}"),
                    Direction::Incoming => format!("exec:cat {quoted}"),
                };
                info!("QEMU {version} has no file transport (8.2+): using the legacy URI {uri}");
                Ok(MigrationTarget::Uri(uri))
            }
            QemuTarget::Exec(command) => {
                let args = exec_args(command)?;
                if channels {
                    info!(?args, "exec: QEMU's typed exec transport (argv, no shell)");
                    Ok(MigrationTarget::from_address(
                        MigrationAddress::Exec { args },
                        true,
                    ))
                } else {
                    info!("exec: the legacy URI exec:{command} (QEMU runs it with /bin/sh -c)");
                    Ok(MigrationTarget::Uri(format!("exec:{command}")))
                }
            }
            _ => {
                let target = match self.address() {
                    Some(address) => MigrationTarget::from_address(address, channels),
                    None => MigrationTarget::Uri(self.to_string()),
                };
                if let QemuTarget::File { .. } = self {
                    match &target {
                        MigrationTarget::Channels(_) => {
                            info!("file: QEMU's typed file transport ({self})")
                        }
                        MigrationTarget::Uri(uri) => info!("file: the legacy URI {uri}"),
                    }
                }
                Ok(target)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_from_uris() {
        assert_eq!(
            QemuTarget::from_uri("file:/a/b,offset=4096"),
            QemuTarget::File {
                path: "/a/b".into(),
                offset: 4096
            }
        );
        let QemuTarget::File { path, offset: 0 } = QemuTarget::from_uri("file:rel/state.bin")
        else {
            panic!("not a file endpoint");
        };
        assert!(
            path.is_absolute() && path.ends_with("rel/state.bin"),
            "{path:?}"
        );
        assert_eq!(
            QemuTarget::from_uri("exec:gzip -c > f"),
            QemuTarget::Exec("gzip -c > f".into())
        );
        assert_eq!(
            QemuTarget::from_uri("exec:gzip -c > f").stream(),
            StreamKind::Exec
        );
        assert_eq!(
            QemuTarget::from_uri("tcp:h:1"),
            QemuTarget::Uri("tcp:h:1".into())
        );
        assert_eq!(QemuTarget::from_uri("tcp:h:1").stream(), StreamKind::Live);
        assert_eq!(
            QemuTarget::from_uri("file:/a b,offset=0x10").to_string(),
            "file:/a b,offset=16"
        );
    }
}
