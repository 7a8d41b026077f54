//! Fitting a plan to the QEMU at hand: older QEMUs lack capabilities and parameters that
//! newer ones have, and what is only a speed-up is left out rather than refused.

use anyhow::Context as _;
use qmigrate_qmp::{
    MigMode, MigrateSetCapabilities, MigrateSetParameters, MigrationCapability,
    MigrationCapabilityStatus, MigrationParameters, Qmp,
};
use tracing::info;

/// Fits the capabilities a plan wants to what this QEMU has (`known`, from
/// `query-migrate-capabilities`): one it lacks is left out when it is to be off, and an error
/// naming the QEMU version that has it when it is to be on.
pub(crate) fn fit_capabilities(
    wanted: Vec<MigrationCapabilityStatus>,
    known: &[MigrationCapabilityStatus],
    qemu: &str,
) -> anyhow::Result<Vec<MigrationCapabilityStatus>> {
    let mut fitted = Vec::with_capacity(wanted.len());
    for want in wanted {
        if known.iter().any(|k| k.capability == want.capability) {
            fitted.push(want);
        } else if want.state {
            let since = match want.capability {
                MigrationCapability::MappedRam => {
                    " (QEMU 9.0+; needed for multifd channels to or from a file)"
                }
                _ => "",
            };
            bail!(
                "QEMU {qemu} does not have the migration capability {}{since}",
                want.capability
            );
        }
    }
    Ok(fitted)
}

/// Fits the parameters a plan wants to what this QEMU has (`current`, from
/// `query-migrate-parameters`): `mode` exists since QEMU 8.2 and is only sent where it does;
/// `direct-io` (9.1+) is a speed-up only, left out where QEMU lacks it.
pub(crate) fn fit_parameters(
    mut wanted: MigrateSetParameters,
    current: &MigrationParameters,
    qemu: &str,
) -> anyhow::Result<MigrateSetParameters> {
    if current.mode.is_none() {
        match wanted.mode.take() {
            Some(MigMode::Normal) | None => {}
            Some(mode) => bail!("QEMU {qemu} has no migration modes (8.2+), so no mode {mode}"),
        }
    }
    if current.direct_io.is_none() && wanted.direct_io.take() == Some(true) {
        info!("QEMU {qemu} has no direct-io (9.1+): mapped-ram goes through the page cache");
    }
    Ok(wanted)
}

/// Sets capabilities, with a hint when this QEMU lacks one we need.
pub(crate) async fn set_capabilities(
    qmp: &Qmp,
    wanted: Vec<MigrationCapabilityStatus>,
) -> anyhow::Result<()> {
    if wanted.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = wanted
        .iter()
        .map(|c| format!("{:?}={}", c.capability, c.state))
        .collect();
    qmp.execute(&MigrateSetCapabilities {
        capabilities: wanted,
    })
    .await
    .with_context(|| format!("QEMU refused the capabilities {}", names.join(", ")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{cap, MigrationPlan, Mode, StreamKind};

    #[test]
    fn capabilities_fit_the_qemu() {
        let old = [
            cap(MigrationCapability::Events, false),
            cap(MigrationCapability::Multifd, false),
        ];
        let plan = MigrationPlan {
            stream: StreamKind::File,
            ..MigrationPlan::default()
        };
        let fitted = fit_capabilities(plan.source_capabilities(), &old, "7.2.0").expect("fits");
        assert!(fitted.contains(&cap(MigrationCapability::Multifd, false)));
        assert!(!fitted
            .iter()
            .any(|c| c.capability == MigrationCapability::MappedRam));
        let plan = MigrationPlan {
            stream: StreamKind::File,
            multifd: Some(4),
            mapped_ram: true,
            ..MigrationPlan::default()
        };
        let err = fit_capabilities(plan.source_capabilities(), &old, "7.2.0").expect_err("old");
        assert!(err.to_string().contains("mapped-ram (QEMU 9.0+"), "{err}");
        // Saves have no return path.
        assert!(plan
            .source_capabilities()
            .contains(&cap(MigrationCapability::ReturnPath, false)));

        let cpr = MigrationPlan {
            mode: Mode::CprReboot,
            ..MigrationPlan::default()
        };
        let params = fit_parameters(
            cpr.destination_parameters(),
            &MigrationParameters::default(),
            "7.2.0",
        );
        assert!(params.is_err());
        let params = fit_parameters(
            MigrationPlan::default().destination_parameters(),
            &MigrationParameters::default(),
            "7.2.0",
        )
        .expect("normal fits");
        assert_eq!(params.mode, None);
    }
}
