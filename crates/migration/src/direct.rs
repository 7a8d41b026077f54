//! The direct data path: after the tunnel's handshake, the TCP connection itself is handed to
//! both QEMUs (`getfd`, then `fd:NAME`), and no migration byte goes through qmigrate.
//!
//! One rule decides when it is taken ([`allowed`]), on both sides, and one name is used for
//! the descriptor ([`DIRECT_FD`]).

use std::os::fd::{AsFd as _, OwnedFd};

use anyhow::Context as _;
use qmigrate_qmp::{Getfd, Qmp};
use qmigrate_transport::{Scheme, TunnelStream};

use crate::QemuTarget;

/// The name under which a tunnel connection is passed to QEMU with `getfd`.
pub const DIRECT_FD: &str = "qmigrate-direct";

/// Whether a migration may take the direct data path: plain TCP (QEMU cannot speak our TLS or
/// WebSocket framing) with one channel (multifd opens several connections, which the tunnel
/// must carry), unless the operator asked for the relay.
pub fn allowed(scheme: Scheme, multifd: Option<u32>, relay: bool) -> bool {
    scheme == Scheme::Tcp && multifd.is_none() && !relay
}

/// The same rule on the destination, for the stream a control connection arrived on.
pub fn allowed_on(stream: &TunnelStream, multifd: Option<u32>) -> bool {
    matches!(stream, TunnelStream::Tcp(_)) && multifd.is_none()
}

/// The target QEMU migrates over once it holds the descriptor.
pub fn target() -> QemuTarget {
    QemuTarget::Uri(format!("fd:{DIRECT_FD}"))
}

/// Takes a plain-TCP tunnel connection over as a blocking socket for QEMU; `None` for any
/// other transport.
pub fn into_fd(stream: TunnelStream) -> crate::Result<Option<OwnedFd>> {
    let TunnelStream::Tcp(tcp) = stream else {
        return Ok(None);
    };
    let tcp = tcp
        .into_std()
        .context("taking the tunnel connection over")?;
    tcp.set_nonblocking(false)
        .context("taking the tunnel connection over")?;
    Ok(Some(OwnedFd::from(tcp)))
}

/// Passes `fd` to QEMU as [`DIRECT_FD`]. Descriptors passed with `getfd` belong to the monitor
/// connection that passed them: `qmp` must stay open until `migrate`/`migrate-incoming` has
/// taken it. `side` names the QEMU for the message (`source`, `destination`).
pub async fn hand_to_qemu(qmp: &Qmp, fd: &OwnedFd, side: &str) -> crate::Result<()> {
    qmp.execute_with_fd(
        &Getfd {
            fdname: DIRECT_FD.to_owned(),
        },
        fd.as_fd(),
    )
    .await
    .with_context(|| format!("passing the tunnel connection to the {side} QEMU (getfd)"))?;
    Ok(())
}
