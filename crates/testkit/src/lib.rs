//! Fixtures shared by qmigrate's integration tests and its benchmark (`qmigrate-bench`). Not
//! published: nothing here is an API for anyone else.
//!
//! # Layout
//! - [`qemu`]: find QEMU (10 and the old 7.2), with the `CI=true` rule that turns a missing
//!   QEMU into a failure instead of a skip; [`qemu::Vm`], a QEMU with a QMP socket in its own
//!   temp dir, killed on drop; the halting firmware and random guest RAM it boots with.
//! - [`ram`]: the guest's RAM dumped with `pmemsave` and compared, byte for byte or by SHA-256.
//! - [`check`]: QMP connections and the state and migration status of a VM, for assertions.
//! - [`within`] and [`per_scheme!`]: a deadline for a test step, and one test per tunnel
//!   scheme for each scenario.

pub mod check;
pub mod qemu;
pub mod ram;

use std::future::Future;
use std::time::Duration;

/// Awaits `fut`, failing the test with `what` if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Defines one module per scheme, each with one `#[tokio::test]` per scenario: an
/// `async fn(Scheme)` of the calling module, run under `limit` (through [`within`]), after
/// `setup` if given. The modules see the caller's items (`use super::*`), so `limit`, the
/// schemes and `setup` are written as in the caller.
///
/// ```ignore
/// per_scheme! {
///     schemes: [tcp => Scheme::Tcp, ws => Scheme::Ws],
///     limit: TEST,
///     setup: capture_logs,
///     scenarios: [small_transfers_are_byte_exact, half_close_source_first],
/// }
/// ```
///
/// defines `tcp::small_transfers_are_byte_exact`, `ws::small_transfers_are_byte_exact`, ...
#[macro_export]
macro_rules! per_scheme {
    (
        schemes: [$($module:ident => $scheme:expr),+ $(,)?],
        limit: $limit:expr,
        setup: $setup:path,
        scenarios: $scenarios:tt $(,)?
    ) => {
        $( $crate::per_scheme!(@mod $module, $scheme, $limit, { $setup(); }, $scenarios); )+
    };
    (
        schemes: [$($module:ident => $scheme:expr),+ $(,)?],
        limit: $limit:expr,
        scenarios: $scenarios:tt $(,)?
    ) => {
        $( $crate::per_scheme!(@mod $module, $scheme, $limit, {}, $scenarios); )+
    };
    (@mod $module:ident, $scheme:expr, $limit:expr, $setup:block, [$($scenario:ident),* $(,)?]) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    $setup
                    let what = concat!(stringify!($module), "::", stringify!($scenario));
                    $crate::within($limit, what, super::$scenario($scheme)).await;
                }
            )*
        }
    };
}
