//! Receivers: the main channel (precopy writes, commands, bulk postcopy pages) and the urgent
//! channel (requested pages, placed by the receiving thread itself).

use uring_net::FrameReader;

use super::state::{DestShared, Staging};
use crate::error::MigrateError;
use crate::protocol::{PhaseAction, Record, RegionTable, RECORD_HEADER_LEN};
use crate::stats::Lane;

/// Reads the payload of a page record and places it atomically.
pub(crate) fn place_record(
    shared: &DestShared,
    reader: &mut FrameReader,
    staging: &mut Staging,
    region: u16,
    offset: u64,
    len: u32,
    lane: Lane,
) -> Result<(), MigrateError> {
    let reg = shared.memory.regions()[region as usize].clone();
    if reg.backing().is_shared() {
        return super::alias::place_record(
            shared,
            reader,
            staging,
            &reg,
            offset as usize,
            len,
            lane,
        );
    }
    let buf = staging.get(len as usize, reg.backing())?;
    reader.read_exact(buf)?;
    shared.place(&reg, offset as usize, buf, lane)?;
    staging.restock(reg.backing());
    Ok(())
}

/// The urgent receiver: only page and zero records, only once userfaultfd is armed. Runs until
/// the connection ends; reports failures to the coordinator.
pub(crate) fn urgent_loop(shared: &DestShared, mut reader: FrameReader, table: &RegionTable) {
    let mut staging = Staging::new();
    // Map and fault in the staging buffer before the first request needs it.
    if let Ok(buf) = staging.get(64 << 10, crate::memory::Backing::Anonymous) {
        buf.fill(0);
    }
    let result = (|| -> Result<(), MigrateError> {
        loop {
            let Some(hdr) = reader.read_header::<RECORD_HEADER_LEN>()? else {
                return Err(MigrateError::Link(
                    "the source closed the urgent channel".into(),
                ));
            };
            let rec = Record::decode(&hdr, table)?;
            match (shared.phase().on_urgent(&rec)?, rec) {
                (
                    PhaseAction::Place,
                    Record::Pages {
                        region,
                        offset,
                        len,
                    },
                ) => place_record(
                    shared,
                    &mut reader,
                    &mut staging,
                    region,
                    offset,
                    len,
                    Lane::Urgent,
                )?,
                (
                    PhaseAction::PlaceZero,
                    Record::Zero {
                        region,
                        offset,
                        len,
                    },
                ) => {
                    let reg = shared.memory.regions()[region as usize].clone();
                    shared.place_zero(&reg, offset as usize, len as usize, &mut staging)?
                }
                _ => {}
            }
        }
    })();
    if let Err(e) = result {
        shared.report(e);
    }
}
