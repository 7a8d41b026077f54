//! Typed async QMP client and QAPI migration models.
//!
//! [`Qmp`] is one QMP connection: it reads QEMU's greeting, negotiates capabilities and then
//! serves commands (matched to replies by `id`) and events (broadcast to every [`Events`]
//! subscriber) at the same time. Commands are types ([`Command`]) that know their QMP name and
//! reply type; replies are decoded in the caller, so one odd reply fails one call, never the
//! connection. [`models`] holds the QAPI types of QEMU 10's migration schema, [`probe`] asks a
//! QEMU what it supports.

#![warn(missing_docs)]

mod client;
pub mod commands;
mod error;
mod fdpass;
pub mod models;
pub mod probe;
mod uri;

pub use client::{ConnectOptions, Event, Events, Greeting, Qmp, QmpTarget, Timestamp};
pub use commands::*;
pub use error::Error;
pub use models::*;
pub use uri::UriError;
