//! The control session of a one-command migration: `qmigrate migrate` on the source and a
//! `qmigrate tunnel-server --qmp` on the destination agree on one plan, the server prepares
//! the destination QEMU, and each side reports how the migration ended.
//!
//! The messages travel on the session's control connection (a tunnel connection opened with
//! [`qmigrate_transport::protocol::Purpose::Control`]), as JSON in the tunnel's envelope, in
//! this order:
//!
//! ```text
//! source (migrate)                        destination (tunnel-server --qmp)
//!   Prepare { settings }  ------------->    plan, [disks: nbd-server-start, block-export-add],
//!                                           migrate-set-*, migrate-incoming
//!                         <-------------    Ready { qemu, direct, exports }  (or Failed, close)
//!   [NBD connections, mirror to ready]
//!   data connection(s), migrate, follow     follow the incoming migration [nbd-server-stop]
//!   Finished { outcome }  ------------->
//!                         <-------------    Done { status, vm, error, started }
//! ```
//!
//! From protocol version 3 both sides also send `Heartbeat` whenever they have sent nothing
//! for a second, at any point of the session (see `link.rs`).
//!
//! The JSON is part of the wire protocol (docs/PROTOCOL.md): statuses and outcomes are typed
//! here but keep QEMU's names on the wire, and a name this build does not know is kept as it
//! came ([`Named::Other`]) rather than refused, so that a newer peer still interoperates.

pub mod destination;
mod link;
pub mod source;

use std::fmt;

use qmigrate_qmp::{MigrationStatus, RunState};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::plan::Compression;

pub use destination::{DestinationEvent, DestinationObserver, MigrationEnd, QmpController};

/// The messages of a control connection, after its `Reply::Accept`, in the order of the
/// module's diagram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Control {
    /// Client: prepare the destination QEMU for these settings (`migrate-incoming`).
    Prepare {
        /// What must match on both sides.
        settings: MigrationSettings,
    },
    /// Client: recover the postcopy migration paused on this route's destination QEMU: listen
    /// again (`migrate-recover`) for the source's resume, on this session's data connections.
    /// The server answers [`Control::Ready`] or [`Control::Failed`], then follows the migration
    /// as after a `prepare`. An older server does not know it and closes the connection.
    Recover {
        /// How the resumed stream is carried (`direct`, `no_start`; the rest is already set on
        /// both QEMUs).
        settings: MigrationSettings,
    },
    /// Server: the destination QEMU listens; the data connections of this session go there.
    Ready {
        /// The destination QEMU's version, for the operator.
        qemu: String,
        /// The direct data path was agreed: the session's one data connection is handed to
        /// the destination QEMU itself, so the client hands its end to the source QEMU.
        #[serde(default)]
        direct: bool,
        /// The NBD exports of the disks the source asked to copy ([`MigrationSettings::disks`]),
        /// reachable through [`qmigrate_transport::protocol::Purpose::Nbd`] connections of this
        /// session. An older server leaves it out: it copies no disk.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        exports: Vec<Export>,
    },
    /// Server: the destination could not be prepared (or followed); `message` is the
    /// destination's own explanation.
    Failed {
        /// What went wrong, for the operator.
        message: String,
    },
    /// Client: the source side has ended.
    Finished {
        /// The source's outcome.
        outcome: SourceEnd,
        /// QEMU's downtime on the source (completed migrations), in milliseconds, for the
        /// destination's metrics; older sources leave it out.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        downtime_ms: Option<u64>,
    },
    /// Server: how the migration ended on the destination.
    Done {
        /// The destination's final migration status (`completed`, `failed`, ...).
        status: Named<MigrationStatus>,
        /// The destination VM's run state afterwards (`running`, `paused`, ...; `unknown`
        /// when the destination could not be asked).
        vm: Named<RunState>,
        /// QEMU's reason when it failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// Whether the server sent `cont`.
        started: bool,
    },
    /// Either side, from protocol version 3 ([`qmigrate_transport::protocol::HEARTBEATS`]):
    /// "still here", whenever it has sent nothing for a second while the session lasts. A
    /// side that hears nothing at all for its dead-peer timeout takes the peer for hung.
    Heartbeat,
}

/// How the source side of a session ended, in [`Control::Finished`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceEnd {
    /// QEMU reported `completed` on the source.
    Completed,
    /// The migration failed on the source.
    Failed,
    /// The source cancelled it (a signal, `--timeout`).
    Cancelled,
    /// Postcopy is paused (the connection broke) and the source gave up reconnecting: both
    /// QEMUs wait for a recovery, which a new session may bring.
    PostcopyPaused,
    /// Anything a newer peer may send; treated as not completed.
    #[serde(other)]
    Other,
}

impl SourceEnd {
    /// The name on the wire, for messages.
    pub fn name(self) -> &'static str {
        match self {
            SourceEnd::Completed => "completed",
            SourceEnd::Failed => "failed",
            SourceEnd::Cancelled => "cancelled",
            SourceEnd::PostcopyPaused => "postcopy-paused",
            SourceEnd::Other => "other",
        }
    }
}

/// The migration settings both QEMUs must agree on, sent by the source in [`Control::Prepare`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationSettings {
    /// multifd channels, `None` for a single stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multifd: Option<u32>,
    /// multifd compression (`zstd`, `zlib`, `none`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Named<Compression>>,
    /// `postcopy-ram`.
    #[serde(default)]
    pub postcopy: bool,
    /// Leave the destination VM paused after a completed migration (no `cont`).
    #[serde(default)]
    pub no_start: bool,
    /// The client offers the direct data path: after the handshake, the TCP connection itself
    /// is handed to both QEMUs (`getfd`, `fd:NAME`), and no byte goes through qmigrate.
    #[serde(default)]
    pub direct: bool,
    /// The source's disks to copy to the destination's (`--copy-storage`), matched by qdev
    /// id: the destination exports its own over NBD (writable) before it answers ready.
    /// Empty: shared storage, as before (older peers neither send nor know it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
}

/// A source disk to copy, in [`MigrationSettings::disks`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// The device's qdev id (`-device virtio-blk-pci,id=ID`): the same device on both sides.
    pub id: String,
    /// The guest-visible size in bytes: the destination's image must have exactly this size.
    pub size: u64,
    /// Read-only on the source (never copied; sent so that the destination can say so).
    #[serde(default)]
    pub read_only: bool,
    /// The source image's format (`qcow2`, `raw`), for the destination's advice.
    pub format: String,
    /// Only the top image is copied (`--copy-storage-inc`): the destination's image must have
    /// a backing chain (the same as the source's). Left out when false; older servers ignore
    /// it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub incremental: bool,
}

/// One disk's NBD export on the destination, in [`Control::Ready`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    /// The disk's qdev id.
    pub disk: String,
    /// The NBD export's name.
    pub name: String,
}

/// A value of an enum both sides know, or the name a newer peer sent that this build does
/// not: kept as it came, so that it is shown (and sent on) exactly.
///
/// On the wire it is the plain string either way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    from = "String",
    into = "String",
    bound = "T: Serialize + DeserializeOwned + Clone"
)]
pub enum Named<T> {
    /// A value this build knows.
    Known(T),
    /// A name this build does not know.
    Other(String),
}

impl<T> Named<T> {
    /// The known value, if it is one.
    pub fn known(&self) -> Option<&T> {
        match self {
            Named::Known(value) => Some(value),
            Named::Other(_) => None,
        }
    }
}

impl<T: PartialEq> Named<T> {
    /// Whether this is `value`.
    pub fn is(&self, value: &T) -> bool {
        self.known() == Some(value)
    }
}

impl<T: Serialize + DeserializeOwned> From<String> for Named<T> {
    fn from(name: String) -> Self {
        // Known only when the name round-trips exactly: an enum's catch-all `Other` case
        // (`#[serde(other)]`) would otherwise swallow the name.
        match serde_json::from_value::<T>(serde_json::Value::String(name.clone())) {
            Ok(value)
                if serde_json::to_value(&value)
                    .ok()
                    .as_ref()
                    .and_then(|v| v.as_str())
                    == Some(&name) =>
            {
                Named::Known(value)
            }
            _ => Named::Other(name),
        }
    }
}

impl<T: Serialize> From<Named<T>> for String {
    fn from(named: Named<T>) -> Self {
        named.to_string()
    }
}

impl<T: Serialize> fmt::Display for Named<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Named::Known(value) => match serde_json::to_value(value) {
                Ok(serde_json::Value::String(name)) => f.write_str(&name),
                _ => f.write_str("?"),
            },
            Named::Other(name) => f.write_str(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use qmigrate_transport::protocol::{decode_body, encode_body};

    use super::*;

    /// Every control message, byte for byte as this version puts it on the wire: a peer built
    /// from an older commit parses exactly these bytes, so a change here breaks it.
    #[test]
    fn control_json_is_stable() {
        let cases: Vec<(Control, &str)> = vec![
            (
                Control::Prepare {
                    settings: MigrationSettings::default(),
                },
                r#"{"type":"prepare","settings":{"postcopy":false,"no_start":false,"direct":false}}"#,
            ),
            (
                Control::Prepare {
                    settings: MigrationSettings {
                        multifd: Some(4),
                        compression: Some(Named::Known(Compression::Zstd)),
                        postcopy: true,
                        no_start: true,
                        direct: true,
                        disks: Vec::new(),
                    },
                },
                r#"{"type":"prepare","settings":{"multifd":4,"compression":"zstd","postcopy":true,"no_start":true,"direct":true}}"#,
            ),
            (
                Control::Prepare {
                    settings: MigrationSettings {
                        disks: vec![Disk {
                            id: "vblk0".into(),
                            size: 16777216,
                            read_only: false,
                            format: "qcow2".into(),
                            incremental: false,
                        }],
                        ..MigrationSettings::default()
                    },
                },
                r#"{"type":"prepare","settings":{"postcopy":false,"no_start":false,"direct":false,"disks":[{"id":"vblk0","size":16777216,"read_only":false,"format":"qcow2"}]}}"#,
            ),
            (
                Control::Ready {
                    qemu: "10.0.2".into(),
                    direct: true,
                    exports: vec![Export {
                        disk: "vblk0".into(),
                        name: "vblk0".into(),
                    }],
                },
                r#"{"type":"ready","qemu":"10.0.2","direct":true,"exports":[{"disk":"vblk0","name":"vblk0"}]}"#,
            ),
            (
                Control::Recover {
                    settings: MigrationSettings {
                        postcopy: true,
                        direct: true,
                        ..MigrationSettings::default()
                    },
                },
                r#"{"type":"recover","settings":{"postcopy":true,"no_start":false,"direct":true}}"#,
            ),
            (
                Control::Finished {
                    outcome: SourceEnd::PostcopyPaused,
                    downtime_ms: None,
                },
                r#"{"type":"finished","outcome":"postcopy-paused"}"#,
            ),
            (
                Control::Ready {
                    qemu: "10.0.2".into(),
                    direct: true,
                    exports: Vec::new(),
                },
                r#"{"type":"ready","qemu":"10.0.2","direct":true}"#,
            ),
            (
                Control::Failed {
                    message: "destination QMP /x: refused".into(),
                },
                r#"{"type":"failed","message":"destination QMP /x: refused"}"#,
            ),
            (
                Control::Finished {
                    outcome: SourceEnd::Completed,
                    downtime_ms: None,
                },
                r#"{"type":"finished","outcome":"completed"}"#,
            ),
            (
                Control::Finished {
                    outcome: SourceEnd::Completed,
                    downtime_ms: Some(42),
                },
                r#"{"type":"finished","outcome":"completed","downtime_ms":42}"#,
            ),
            (
                Control::Finished {
                    outcome: SourceEnd::Cancelled,
                    downtime_ms: None,
                },
                r#"{"type":"finished","outcome":"cancelled"}"#,
            ),
            (
                Control::Finished {
                    outcome: SourceEnd::Failed,
                    downtime_ms: None,
                },
                r#"{"type":"finished","outcome":"failed"}"#,
            ),
            (Control::Heartbeat, r#"{"type":"heartbeat"}"#),
            (
                Control::Done {
                    status: Named::Known(MigrationStatus::Completed),
                    vm: Named::Known(RunState::Running),
                    error: None,
                    started: true,
                },
                r#"{"type":"done","status":"completed","vm":"running","started":true}"#,
            ),
            (
                Control::Done {
                    status: Named::Known(MigrationStatus::Failed),
                    vm: Named::Known(RunState::InMigrate),
                    error: Some("load of migration failed".into()),
                    started: false,
                },
                r#"{"type":"done","status":"failed","vm":"inmigrate","error":"load of migration failed","started":false}"#,
            ),
        ];
        for (msg, json) in cases {
            assert_eq!(String::from_utf8(encode_body(&msg)).expect("utf-8"), json);
            assert_eq!(decode_body::<Control>(json.as_bytes()).expect(json), msg);
        }
        // What an older peer leaves out still decodes: `direct` arrived after `ready`.
        assert_eq!(
            decode_body::<Control>(br#"{"type":"ready","qemu":"9.2.0"}"#).expect("old ready"),
            Control::Ready {
                qemu: "9.2.0".into(),
                direct: false,
                exports: Vec::new(),
            }
        );
        assert_eq!(
            decode_body::<Control>(br#"{"type":"prepare","settings":{}}"#).expect("old prepare"),
            Control::Prepare {
                settings: MigrationSettings::default()
            }
        );
    }

    /// Names this build does not know are kept exactly, and sent on as they came.
    #[test]
    fn unknown_names_are_kept() {
        let json = r#"{"type":"done","status":"colo-wait","vm":"unknown","started":false}"#;
        let msg = decode_body::<Control>(json.as_bytes()).expect("newer done");
        assert_eq!(
            msg,
            Control::Done {
                status: Named::Other("colo-wait".into()),
                vm: Named::Other("unknown".into()),
                error: None,
                started: false,
            }
        );
        assert_eq!(String::from_utf8(encode_body(&msg)).expect("utf-8"), json);
        let json = r#"{"type":"finished","outcome":"paused"}"#;
        assert_eq!(
            decode_body::<Control>(json.as_bytes()).expect("newer outcome"),
            Control::Finished {
                outcome: SourceEnd::Other,
                downtime_ms: None,
            }
        );
        let json = r#"{"type":"prepare","settings":{"compression":"lz4","postcopy":false,"no_start":false,"direct":false}}"#;
        let Control::Prepare { settings } = decode_body::<Control>(json.as_bytes()).expect("lz4")
        else {
            panic!("not a prepare");
        };
        assert_eq!(settings.compression, Some(Named::Other("lz4".into())));
    }
}
