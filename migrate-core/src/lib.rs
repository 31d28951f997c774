//! Postcopy live-migration engine.
//!
//! A VMM hands the engine its guest memory ([`memory::GuestMemory`]) and a dirty log
//! ([`dirty::DirtyLog`]); [`source::Source`] and [`dest::Destination`] migrate it, precopy
//! first, then postcopy, with page requests served in one of three [`config::Mode`]s.
//!
//! See `docs/ARCHITECTURE.md` for the threads and hops and `docs/PROTOCOL.md` for the wire
//! protocol.

pub mod bitmap;
pub mod config;
pub mod dest;
pub mod dirty;
pub mod error;
pub mod eventfd;
pub mod handshake;
pub mod memory;
pub mod protocol;
pub mod sched;
pub mod source;
pub mod stats;
pub mod uffd;
pub mod verify;
pub mod workload;

pub use config::{DestConfig, Mode, PrecopyLimits, ReconnectPolicy, SourceConfig};
pub use dest::{DestControl, DestProgress, DestReport, DestWatch, Destination};
pub use error::MigrateError;
pub use memory::{Backing, GuestMemory, GuestRegion, RegionSpec};
pub use source::{Source, SourceControl, SourceReport};
