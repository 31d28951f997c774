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
    #[error("connection lost: {0}")]
    Link(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("internal: {0}")]
    Internal(String),
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl MigrateError {
    /// A broken or silent connection (as opposed to a peer that misbehaved or failed): in
    /// postcopy the migration pauses and resumes over new connections.
    pub fn is_link_failure(&self) -> bool {
        matches!(self, MigrateError::Net(_) | MigrateError::Link(_))
    }
}
