//! The plan of one migration: what both QEMUs must agree on and what only the source sets,
//! built and validated once, before either QEMU is touched.

use qmigrate_qmp::{
    MigMode, MigrateSetParameters, MigrationCapability, MigrationCapabilityStatus,
    MultiFdCompression,
};
use serde::{Deserialize, Serialize};

/// Effectively no limit: QEMU's own default (128 MiB/s) throttles every migration on a fast
/// link, and 1 TiB/s is well inside what every QEMU accepts for `max-bandwidth`.
pub const UNLIMITED_BANDWIDTH: u64 = 1 << 40;

/// Compression of multifd channels; both ends must use the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// No compression (QEMU's default).
    None,
    /// Slow, small.
    Zlib,
    /// Faster than zlib; the better choice when the link is the bottleneck.
    Zstd,
}

impl Compression {
    /// The `multifd-compression` value.
    pub fn qapi(self) -> MultiFdCompression {
        match self {
            Compression::None => MultiFdCompression::None,
            Compression::Zlib => MultiFdCompression::Zlib,
            Compression::Zstd => MultiFdCompression::Zstd,
        }
    }

    /// QEMU's name for it in `multifd-compression`.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

/// The migration mode (QEMU's `mode` parameter, QEMU 8.2+).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// An ordinary migration or save.
    #[default]
    Normal,
    /// Save for a restart of QEMU on this host (a host kernel upgrade): with a shared memory
    /// backend and `x-ignore-shared` the guest RAM stays in its backing file instead of the
    /// state file.
    CprReboot,
}

impl Mode {
    /// The `mode` value.
    pub fn qapi(self) -> MigMode {
        match self {
            Mode::Normal => MigMode::Normal,
            Mode::CprReboot => MigMode::CprReboot,
        }
    }
}

/// What carries the migration stream, as far as capabilities and the source's handling care.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamKind {
    /// A live migration to another QEMU (a socket): with a return path.
    #[default]
    Live,
    /// A state file QEMU writes or reads itself: seekable, so mapped-ram works.
    File,
    /// A command's stdin or stdout: a pipe.
    Exec,
}

/// The capabilities and parameters of one migration, as chosen on the command line.
///
/// The part that must match on both sides (multifd and its channel count, compression,
/// postcopy, mapped-ram, x-ignore-shared) is set by both [`prepare_incoming`] and
/// [`run_migration`]; the rest only matters to the source.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MigrationPlan {
    /// What carries the stream; a save or restore when it is not [`StreamKind::Live`].
    pub stream: StreamKind,
    /// `mapped-ram` (QEMU 9.0+, [`StreamKind::File`] only): every page at its own offset in the
    /// file, so multifd channels write and read it in parallel.
    pub mapped_ram: bool,
    /// The `direct-io` parameter (QEMU 9.1+, [`StreamKind::File`] with mapped-ram and multifd):
    /// the multifd channels open the state file with O_DIRECT, so pages go between guest RAM
    /// and the disk without a copy through the page cache, and a save no longer leaves the
    /// whole file to be flushed afterwards. Only for a file system that takes O_DIRECT (see
    /// [`crate::statefile::can_write_direct`]); a QEMU without the parameter does without it.
    pub direct_io: bool,
    /// `x-ignore-shared`: leave out RAM on a shared memory backend (for `cpr-reboot`).
    pub ignore_shared: bool,
    /// The migration mode; `Normal` unless `--mode` says otherwise.
    pub mode: Mode,
    /// Number of multifd channels, or `None` for the single-stream migration.
    pub multifd: Option<u32>,
    /// Compression of the multifd channels (needs `multifd`).
    pub compression: Option<Compression>,
    /// Enable postcopy (`postcopy-ram`).
    pub postcopy: bool,
    /// Source only: throttle the guest's CPUs when the migration does not converge.
    pub auto_converge: bool,
    /// Source only: `max-bandwidth` in bytes per second; `None` means [`UNLIMITED_BANDWIDTH`].
    pub max_bandwidth: Option<u64>,
    /// Source only: `max-postcopy-bandwidth` in bytes per second once in postcopy; `None` is
    /// unlimited (every page the guest misses on the destination stalls it).
    pub max_postcopy_bandwidth: Option<u64>,
    /// Source only: `downtime-limit` in milliseconds; `None` keeps QEMU's (300 ms).
    pub downtime_limit: Option<u64>,
    /// Source only: `pause-before-switchover`, for a migration that copies disks: QEMU waits
    /// in `pre-switchover` (vCPUs stopped) until the disk mirrors are completed.
    pub pause_before_switchover: bool,
}

/// A plan that cannot work; reported as a usage error before anything starts. The messages
/// speak of QEMU's settings; a front end that knows its flags words them its own way (the
/// `qmigrate` CLI: `crates/cli/src/hints.rs`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// No multifd channels, or more than QEMU's 255.
    #[error("multifd channels must be between 1 and 255, not {0}")]
    MultifdChannels(u32),
    /// Compression only exists for multifd channels.
    #[error("compression needs multifd channels: QEMU compresses multifd channels only")]
    CompressionWithoutMultifd,
    /// QEMU rejects a downtime limit above 2000 s.
    #[error("the downtime limit must be between 0 and 2000000 ms, not {0}")]
    DowntimeLimit(u64),
    /// Multifd to a file means mapped-ram, which writes each page at its own offset.
    #[error(
        "multifd channels cannot be used with exec: multifd channels to or from a file use \
         mapped-ram, which puts every page at its own offset in a seekable file, and a \
         command's stdin or stdout is a pipe"
    )]
    MultifdWithPipe,
    /// mapped-ram stores raw pages at fixed offsets.
    #[error(
        "compression cannot be used with file: multifd channels to a file use mapped-ram, which \
         stores raw pages at fixed offsets"
    )]
    CompressionToFile,
    /// Postcopy needs a running destination asking for pages.
    #[error(
        "postcopy needs a running destination QEMU that asks for pages; a save to file: or \
         exec: is precopy only"
    )]
    PostcopyToFile,
    /// cpr-reboot keeps RAM on this host.
    #[error(
        "mode cpr-reboot restarts QEMU on this host from a saved state: it takes file:PATH (or \
         exec:), not a live migration"
    )]
    CprRebootLive,
    /// A restore with multifd channels needs a state saved with mapped-ram.
    #[error("{0} was saved without mapped-ram: it loads over one channel only")]
    MultifdWithoutMappedRam(String),
}

impl MigrationPlan {
    /// Checks that the flags make sense together, before QEMU is touched.
    pub fn validate(&self) -> Result<(), PlanError> {
        if let Some(n) = self.multifd {
            if !(1..=255).contains(&n) {
                return Err(PlanError::MultifdChannels(n));
            }
        }
        if self.compression.is_some_and(|c| c != Compression::None) && self.multifd.is_none() {
            return Err(PlanError::CompressionWithoutMultifd);
        }
        if let Some(ms) = self.downtime_limit {
            if ms > 2_000_000 {
                return Err(PlanError::DowntimeLimit(ms));
            }
        }
        match self.stream {
            StreamKind::Live if self.mode == Mode::CprReboot => {
                return Err(PlanError::CprRebootLive)
            }
            StreamKind::Live => {}
            StreamKind::Exec if self.multifd.is_some() => return Err(PlanError::MultifdWithPipe),
            StreamKind::File | StreamKind::Exec if self.postcopy => {
                return Err(PlanError::PostcopyToFile)
            }
            StreamKind::File if self.compression.is_some_and(|c| c != Compression::None) => {
                return Err(PlanError::CompressionToFile)
            }
            StreamKind::File | StreamKind::Exec => {}
        }
        Ok(())
    }

    /// True for a save or restore ([`StreamKind::File`] or [`StreamKind::Exec`]).
    pub fn is_save(&self) -> bool {
        self.stream != StreamKind::Live
    }

    /// The capabilities that both QEMUs must agree on, set to exactly what this plan wants
    /// (so that a leftover from an earlier run cannot make the two sides disagree).
    fn shared_capabilities(&self) -> Vec<MigrationCapabilityStatus> {
        vec![
            cap(MigrationCapability::Events, true),
            cap(MigrationCapability::Multifd, self.multifd.is_some()),
            cap(MigrationCapability::PostcopyRam, self.postcopy),
            // The return path lets the destination tell the source how loading ended: with it
            // the source reports `completed` only after the destination has loaded everything
            // (not when the last byte left for the tunnel), and postcopy needs it for page
            // requests. A file or a command has no way back: QEMU fails the save at its end
            // ("Unable to read from file") if it is on.
            cap(
                MigrationCapability::ReturnPath,
                self.stream == StreamKind::Live,
            ),
            cap(MigrationCapability::MappedRam, self.mapped_ram),
            cap(MigrationCapability::XIgnoreShared, self.ignore_shared),
        ]
    }

    /// Capabilities for the destination QEMU.
    pub fn destination_capabilities(&self) -> Vec<MigrationCapabilityStatus> {
        self.shared_capabilities()
    }

    /// Capabilities for the source QEMU.
    pub fn source_capabilities(&self) -> Vec<MigrationCapabilityStatus> {
        let mut caps = self.shared_capabilities();
        caps.push(cap(MigrationCapability::AutoConverge, self.auto_converge));
        if self.pause_before_switchover {
            caps.push(cap(MigrationCapability::PauseBeforeSwitchover, true));
        }
        caps
    }

    /// Parameters for the destination QEMU: only what must match the source.
    pub fn destination_parameters(&self) -> MigrateSetParameters {
        let mut params = MigrateSetParameters {
            mode: Some(self.mode.qapi()),
            ..MigrateSetParameters::default()
        };
        if let Some(n) = self.multifd {
            params.multifd_channels = Some(u64::from(n));
            params.multifd_compression = Some(self.compression.unwrap_or(Compression::None).qapi());
        }
        if self.stream == StreamKind::File {
            // Off as well as on, so that a leftover from an earlier save cannot point O_DIRECT
            // at a file system that refuses it.
            params.direct_io = Some(self.direct_io);
        }
        params
    }

    /// Parameters for the source QEMU.
    pub fn source_parameters(&self) -> MigrateSetParameters {
        let mut params = self.destination_parameters();
        params.max_bandwidth = Some(self.max_bandwidth.unwrap_or(UNLIMITED_BANDWIDTH));
        params.downtime_limit = self.downtime_limit;
        if self.postcopy {
            // 0 is "unlimited" here (unlike max-bandwidth): once the guest runs on the
            // destination, every missing page stalls it, so only an explicit cap holds.
            params.max_postcopy_bandwidth = Some(self.max_postcopy_bandwidth.unwrap_or(0));
        }
        params
    }

    /// A short description for messages: `multifd 4 (zstd), postcopy on` for a live migration,
    /// `multifd 4, mapped-ram` for a save.
    pub fn describe(&self) -> String {
        let multifd = match (self.multifd, self.compression) {
            (None, _) => "single channel".to_owned(),
            (Some(n), None | Some(Compression::None)) => format!("multifd {n}"),
            (Some(n), Some(c)) => format!("multifd {n} ({})", c.qemu_name()),
        };
        if !self.is_save() {
            let postcopy = if self.postcopy { "on" } else { "off" };
            return format!("{multifd}, postcopy {postcopy}");
        }
        let mut text = multifd;
        if self.mapped_ram {
            text.push_str(", mapped-ram");
        }
        if self.direct_io {
            text.push_str(", direct-io");
        }
        if self.mode == Mode::CprReboot {
            text.push_str(", mode cpr-reboot");
        }
        if self.ignore_shared {
            text.push_str(", x-ignore-shared");
        }
        text
    }
}

pub(crate) fn cap(capability: MigrationCapability, state: bool) -> MigrationCapabilityStatus {
    MigrationCapabilityStatus { capability, state }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::fit_parameters;
    use crate::source::parameters_to_restore;
    use qmigrate_qmp::MigrationParameters;

    #[test]
    fn plan_validation() {
        assert_eq!(MigrationPlan::default().validate(), Ok(()));
        let plan = MigrationPlan {
            multifd: Some(0),
            ..Default::default()
        };
        assert_eq!(plan.validate(), Err(PlanError::MultifdChannels(0)));
        let plan = MigrationPlan {
            compression: Some(Compression::Zstd),
            ..Default::default()
        };
        assert_eq!(plan.validate(), Err(PlanError::CompressionWithoutMultifd));
        let plan = MigrationPlan {
            compression: Some(Compression::None),
            ..Default::default()
        };
        assert_eq!(plan.validate(), Ok(()));
    }

    #[test]
    fn capabilities_match_on_both_sides() {
        let plan = MigrationPlan {
            multifd: Some(4),
            postcopy: true,
            auto_converge: true,
            ..Default::default()
        };
        let dest = plan.destination_capabilities();
        let src = plan.source_capabilities();
        for c in &dest {
            assert!(src.contains(c), "{c:?} differs");
        }
        assert!(dest.contains(&cap(MigrationCapability::Multifd, true)));
        assert!(dest.contains(&cap(MigrationCapability::PostcopyRam, true)));
        assert!(dest.contains(&cap(MigrationCapability::ReturnPath, true)));
        assert!(src.contains(&cap(MigrationCapability::AutoConverge, true)));

        let single = MigrationPlan::default().destination_capabilities();
        assert!(single.contains(&cap(MigrationCapability::Multifd, false)));
        assert!(single.contains(&cap(MigrationCapability::ReturnPath, true)));
    }

    #[test]
    fn parameters() {
        let plan = MigrationPlan {
            multifd: Some(4),
            compression: Some(Compression::Zstd),
            ..Default::default()
        };
        let src = plan.source_parameters();
        assert_eq!(src.max_bandwidth, Some(UNLIMITED_BANDWIDTH));
        assert_eq!(src.multifd_channels, Some(4));
        assert_eq!(src.downtime_limit, None);
        let dest = plan.destination_parameters();
        assert_eq!(dest.max_bandwidth, None);
        assert_eq!(dest.multifd_channels, Some(4));
        assert_eq!(dest.multifd_compression, src.multifd_compression);
        // The mode is always set (to what QEMU calls it), so that a leftover cpr-reboot from
        // an earlier run cannot apply.
        assert_eq!(
            MigrationPlan::default().destination_parameters(),
            MigrateSetParameters {
                mode: Some(MigMode::Normal),
                ..MigrateSetParameters::default()
            }
        );
        assert_eq!(plan.describe(), "multifd 4 (zstd), postcopy off");
    }

    #[test]
    fn direct_io_only_for_files_and_set_either_way() {
        let save = MigrationPlan {
            stream: StreamKind::File,
            multifd: Some(4),
            mapped_ram: true,
            direct_io: true,
            ..MigrationPlan::default()
        };
        assert_eq!(save.source_parameters().direct_io, Some(true));
        assert_eq!(save.destination_parameters().direct_io, Some(true));
        assert_eq!(save.describe(), "multifd 4, mapped-ram, direct-io");
        // A plain save turns a leftover direct-io off; a live migration leaves it alone.
        let plain = MigrationPlan {
            stream: StreamKind::File,
            ..MigrationPlan::default()
        };
        assert_eq!(plain.source_parameters().direct_io, Some(false));
        assert_eq!(MigrationPlan::default().source_parameters().direct_io, None);

        // Set back on the source afterwards; left out for a QEMU without it (before 9.1).
        let before = MigrationParameters {
            direct_io: Some(false),
            ..Default::default()
        };
        let restore = parameters_to_restore(&save.source_parameters(), &before);
        assert_eq!(restore.direct_io, Some(false));
        let fitted = fit_parameters(
            save.source_parameters(),
            &MigrationParameters {
                mode: Some(MigMode::Normal),
                ..Default::default()
            },
            "9.0.0",
        )
        .expect("fits without direct-io");
        assert_eq!(fitted.direct_io, None);
        assert_eq!(fitted.multifd_channels, Some(4));
    }
}
