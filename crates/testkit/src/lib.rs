//! Fixtures shared by qmigrate's integration tests and its benchmark (`qmigrate-bench`). Not
//! published: nothing here is an API for anyone else.
//!
//! # Layout
//! - [`qemu`]: find QEMU (10 and the old 7.2), with the `CI=true` rule that turns a missing
//!   QEMU into a failure instead of a skip; [`qemu::Vm`], a QEMU with a QMP socket in its own
//!   temp dir, killed on drop; the halting firmware and random guest RAM it boots with.
//! - [`dirtying`]: a firmware that dirties a region of guest RAM at a paced rate and counts
//!   its passes, for convergence tests and the `converge` benchmark.
//! - [`ram`]: the guest's RAM dumped with `pmemsave` and compared, byte for byte or by SHA-256.
//! - [`check`]: QMP connections and the state and migration status of a VM, for assertions.
//! - [`child`]: child processes killed on drop, with their CPU time and peak memory (`wait4`)
//!   and live `/proc` figures; waits for sockets to listen without connecting to them.
//! - [`guest`]: real Linux guests (a Debian cloud kernel, busybox and a self-checking
//!   workload, built at test time and cached in `target/guest/`), booted under TCG, their
//!   serial heartbeats judged after a migration; a gate that runs them one at a time.
//! - [`within`] and [`per_scheme!`]: a deadline for a test step, and one test per tunnel
//!   scheme for each scenario.

pub mod check;
pub mod child;
pub mod dirtying;
pub mod guest;
pub mod netns;
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
/// `async fn(Scheme)` of the calling module, run under the `within` limit (see [`within`]),
/// after calling `after` (a `fn()`, e.g. one that installs a log subscriber) if given. The
/// modules see the caller's items (`use super::*`), so everything is written as in the
/// caller.
///
/// ```ignore
/// per_scheme!(
///     tcp = Scheme::Tcp, ws = Scheme::Ws; within TEST, after capture_logs;
///     small_transfers_are_byte_exact,
///     half_close_source_first,
/// );
/// ```
///
/// defines `tcp::small_transfers_are_byte_exact`, `ws::small_transfers_are_byte_exact`,
/// `tcp::half_close_source_first` and `ws::half_close_source_first`.
#[macro_export]
macro_rules! per_scheme {
    (
        $($module:ident = $scheme:path),+ ; within $limit:expr $(, after $setup:path)? ;
        $($scenario:ident),* $(,)?
    ) => {
        $crate::per_scheme!(
            @each [$($module = $scheme),+] [$limit] [$($setup)?] [$($scenario),*]
        );
    };
    (@each [$module:ident = $scheme:path $(, $($rest:tt)*)?] $limit:tt $setup:tt $scenarios:tt) => {
        $crate::per_scheme!(@mod $module, $scheme, $limit, $setup, $scenarios);
        $( $crate::per_scheme!(@each [$($rest)*] $limit $setup $scenarios); )?
    };
    (@mod $module:ident, $scheme:path, [$limit:expr], $setup:tt, [$($scenario:ident),*]) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    $crate::per_scheme!(@setup $setup);
                    let what = concat!(stringify!($module), "::", stringify!($scenario));
                    $crate::within($limit, what, super::$scenario($scheme)).await;
                }
            )*
        }
    };
    (@setup []) => {};
    (@setup [$setup:path]) => {
        $setup();
    };
}
