//! Flag values shared by the subcommands: the engine's enums as clap sees them (the engine
//! itself knows nothing of clap).

use qmigrate_migration::{Compression, Mode};

/// `--compress ALGO`: compression of multifd channels; both ends must use the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompressArg {
    /// No compression (QEMU's default).
    None,
    /// Slow, small.
    Zlib,
    /// Faster than zlib; the better choice when the link is the bottleneck.
    Zstd,
}

impl From<CompressArg> for Compression {
    fn from(arg: CompressArg) -> Self {
        match arg {
            CompressArg::None => Compression::None,
            CompressArg::Zlib => Compression::Zlib,
            CompressArg::Zstd => Compression::Zstd,
        }
    }
}

/// `--mode MODE`: the migration mode (QEMU's `mode` parameter, QEMU 8.2+).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ModeArg {
    /// An ordinary migration or save.
    #[default]
    Normal,
    /// Save for a restart of QEMU on this host (a host kernel upgrade): with a shared memory
    /// backend and `x-ignore-shared` the guest RAM stays in its backing file instead of the
    /// state file.
    CprReboot,
}

impl From<ModeArg> for Mode {
    fn from(arg: ModeArg) -> Self {
        match arg {
            ModeArg::Normal => Mode::Normal,
            ModeArg::CprReboot => Mode::CprReboot,
        }
    }
}
