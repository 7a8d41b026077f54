//! The flags every benchmark takes, and where the qmigrate under test is.

use std::path::{Path, PathBuf};

use anyhow::bail;

/// Flags shared by `relay`, `migrate` and `save`.
#[derive(Debug, clap::Args)]
pub struct Common {
    /// Repetitions; the variants are interleaved so that machine noise hits all of them alike.
    #[arg(long, default_value_t = 3)]
    pub reps: u32,

    /// The qmigrate binary to measure (default: the one next to this benchmark).
    #[arg(long, value_name = "PATH")]
    pub qmigrate: Option<PathBuf>,

    /// Print the results as one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

impl Common {
    /// The qmigrate binary to run; `needed` says whether it must exist (a run of only
    /// socat and direct variants does without).
    pub fn qmigrate_bin(&self, needed: bool) -> anyhow::Result<PathBuf> {
        qmigrate_bin(self.qmigrate.as_deref(), needed)
    }
}

/// `explicit` (a `--qmigrate PATH`), else the qmigrate next to this benchmark; `needed` says
/// whether it must exist.
pub fn qmigrate_bin(explicit: Option<&Path>, needed: bool) -> anyhow::Result<PathBuf> {
    let path = match explicit {
        Some(path) => path.to_owned(),
        None => std::env::current_exe()?.with_file_name("qmigrate"),
    };
    if needed && !path.exists() {
        bail!(
            "{} does not exist: build it first (cargo build --release -p qmigrate) or pass --qmigrate PATH",
            path.display()
        );
    }
    Ok(path)
}
