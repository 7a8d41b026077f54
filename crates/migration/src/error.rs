//! The engine's one error type: a chain of messages that say what went wrong, and the kind of
//! failure a front end acts on.

use std::fmt;

/// What kind of failure an [`Error`] is: what a front end needs to pick its exit code.
///
/// Inside the engine a kind is attached to an error chain as its context, where the failure
/// is found; its `Display` is the headline of the report (`cannot reach QEMU's QMP socket:
/// ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The plan or the arguments do not make sense together; nothing was touched.
    Usage,
    /// QEMU's QMP socket could not be reached (no socket, not a socket, refused, busy).
    QmpUnreachable,
    /// The destination refused the migration before it started; the source was not touched.
    Refused,
    /// The migration (or a step of it) failed.
    Failed,
    /// The migration was cancelled (a signal, a timeout, the caller).
    Cancelled,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Usage => "invalid usage",
            ErrorKind::QmpUnreachable => "cannot reach QEMU's QMP socket",
            ErrorKind::Refused | ErrorKind::Failed => "migration failed",
            ErrorKind::Cancelled => "migration cancelled",
        })
    }
}

/// An error of the migration engine: the messages from the outermost step to the root cause
/// (`{:#}` prints them all), and its [`ErrorKind`].
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Error(#[from] anyhow::Error);

impl Error {
    /// An error of `kind` with this chain of causes.
    pub fn new(kind: ErrorKind, source: impl Into<anyhow::Error>) -> Self {
        Error(source.into().context(kind))
    }

    /// The kind of failure: the outermost kind attached anywhere in the chain, [`ErrorKind::Failed`]
    /// when none is.
    pub fn kind(&self) -> ErrorKind {
        // anyhow's `downcast_ref` looks through nested context layers, which `chain()` does not;
        // an engine error wrapped by another one is found in the chain.
        if let Some(kind) = self.0.downcast_ref::<ErrorKind>() {
            return *kind;
        }
        self.0
            .chain()
            .skip(1)
            .find_map(|cause| cause.downcast_ref::<Error>())
            .map_or(ErrorKind::Failed, Error::kind)
    }

    /// The outermost error of type `E` in the chain (typed errors a front end words in its
    /// own terms, such as [`crate::PlanError`]), looking through context layers.
    pub fn downcast_ref<E>(&self) -> Option<&E>
    where
        E: fmt::Display + fmt::Debug + Send + Sync + 'static,
    {
        self.0.downcast_ref::<E>()
    }

    /// The outermost error of the chain as its own type (this error's message is its
    /// message), for a front end that words typed errors itself; the causes after it are
    /// this error's `source()`.
    pub fn head(&self) -> &(dyn std::error::Error + 'static) {
        let head: &(dyn std::error::Error + Send + Sync + 'static) = &*self.0;
        head
    }

    /// The chain of messages, for a front end that adds its own context.
    pub fn into_anyhow(self) -> anyhow::Error {
        self.0
    }
}

impl From<crate::PlanError> for Error {
    fn from(err: crate::PlanError) -> Self {
        Error::new(ErrorKind::Usage, err)
    }
}

/// The engine's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kind_is_found_wherever_it_was_attached() {
        let err = Error::from(anyhow::anyhow!("no socket").context(ErrorKind::QmpUnreachable));
        assert_eq!(err.kind(), ErrorKind::QmpUnreachable);
        assert_eq!(
            format!("{err:#}"),
            "cannot reach QEMU's QMP socket: no socket"
        );
        let outer = Error::from(anyhow::Error::from(err).context("destination QMP /x"));
        assert_eq!(outer.kind(), ErrorKind::QmpUnreachable);
        assert_eq!(
            format!("{outer:#}"),
            "destination QMP /x: cannot reach QEMU's QMP socket: no socket"
        );
        assert_eq!(
            Error::from(anyhow::anyhow!("boom")).kind(),
            ErrorKind::Failed
        );
    }
}
