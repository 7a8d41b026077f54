//! One module per subcommand: its `Args` and its `run`.

mod common;
pub mod migrate;
pub mod receive;
pub mod recover;
pub mod send;
pub mod tunnel_client;
pub mod tunnel_server;
