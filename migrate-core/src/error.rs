use thiserror::Error;

use crate::dirty::DirtyError;
use crate::memory::MemoryError;
use crate::protocol::ProtocolError;
use crate::uffd::UffdError;

/// Why a migration failed.
#[derive(Debug, Error)]
pub enum MigrateError {
    #[error("network: {0}")]
    Net(#[from] uring_net::NetError),
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("userfaultfd: {0}")]
    Uffd(#[from] UffdError),
    #[error("dirty tracking: {0}")]
    Dirty(#[from] DirtyError),
    #[error("the guest could not be paused: {0}")]
    Pause(String),
    #[error("the migration was cancelled during precopy: {0}")]
    Cancelled(String),
    #[error("the peer failed: {0}")]
    Remote(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl MigrateError {
    /// The same error for a second observer (errors are reported by the thread that saw them
    /// and by the thread that waits for the migration).
    pub(crate) fn duplicate(&self) -> MigrateError {
        MigrateError::Internal(self.to_string())
    }
}
