//! Typed async QMP client and QAPI migration models.
//!
//! [`Qmp`] is one QMP connection: it reads QEMU's greeting, negotiates capabilities and then
//! serves commands (matched to replies by `id`) and events (broadcast to every [`Events`]
//! subscriber) at the same time. Commands are types ([`Command`]) that know their QMP name and
//! reply type; replies are decoded in the caller, so one odd reply fails one call, never the
//! connection. [`models`] holds the QAPI types of QEMU 10's migration schema, [`probe`] asks a
//! QEMU what it supports.
//!
//! ```no_run
//! use qmigrate_qmp::{probe, ConnectOptions, MigrateIncoming, MigrationAddress, MigrationTarget, Qmp, QueryMigrate};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let qmp = Qmp::connect_unix("/run/dst.qmp", &ConnectOptions::default()).await?;
//! let addr: MigrationAddress = "unix:/run/dst-migration.sock".parse()?;
//! let channels = probe::supports_channels(&qmp).await?;
//! qmp.execute(&MigrateIncoming::new(MigrationTarget::from_address(addr, channels))).await?;
//! let mut events = qmp.events();
//! while let Ok(event) = events.recv().await {
//!     if event.migration_status().is_some_and(|s| s.is_terminal()) {
//!         break;
//!     }
//! }
//! println!("{:?}", qmp.execute(&QueryMigrate).await?.status);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod block;
mod client;
pub mod commands;
mod error;
mod fdpass;
pub mod models;
pub mod probe;
mod uri;

pub use block::*;
#[doc(hidden)]
pub use client::fuzzing;
pub use client::{ConnectOptions, Event, Events, Greeting, Qmp, QmpTarget, Timestamp};
pub use commands::*;
pub use error::Error;
pub use models::*;
pub use uri::{split_command, UriError};
