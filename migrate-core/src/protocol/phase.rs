//! The destination's protocol state machine, free of I/O.
//!
//! ```text
//!  Precopy ──Postcopy──► Armed ──Run──► Running ──End──► Ended
//!   │  pages/zero: write into guest RAM directly (a page may arrive many times)
//!   │  discard: drop pages dirtied since they were sent
//!              Armed/Running: pages/zero placed atomically with userfaultfd
//!                             (a page arriving twice is skipped)
//! ```
//! The urgent channel carries only page and zero records, and only once userfaultfd is armed.

use super::{ProtocolError, Record};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestPhase {
    Precopy,
    Armed,
    Running,
    Ended,
}

/// What the driver must do with a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhaseAction {
    /// Copy the payload into guest memory (overwrite allowed).
    WriteDirect,
    /// Make the range read as zeroes (overwrite allowed).
    ZeroDirect,
    /// Drop the listed pages so they fault in postcopy.
    Discard,
    /// Register userfaultfd and start the fault handler.
    Arm,
    /// Let the guest run.
    Run,
    /// Place the payload with one atomic userfaultfd copy per host page (skip present pages).
    Place,
    /// Place zero pages atomically.
    PlaceZero,
    /// Keep the source's digests for verification.
    StoreDigests,
    /// The source has sent everything.
    End,
    /// Nothing to do (keep-alive).
    Nothing,
}

impl DestPhase {
    pub fn name(self) -> &'static str {
        match self {
            DestPhase::Precopy => "precopy",
            DestPhase::Armed => "postcopy-armed",
            DestPhase::Running => "postcopy-running",
            DestPhase::Ended => "ended",
        }
    }

    /// Is userfaultfd armed (so pages must be placed atomically)?
    pub fn is_postcopy(self) -> bool {
        matches!(self, DestPhase::Armed | DestPhase::Running)
    }

    /// Advances the main channel's phase for `record` and says what to do with it.
    pub fn on_main(&mut self, record: &Record) -> Result<PhaseAction, ProtocolError> {
        use DestPhase::*;
        let action = match (*self, record) {
            // Heartbeats continue after End while the source waits for Done.
            (_, Record::Ping) => PhaseAction::Nothing,
            (Precopy, Record::Pages { .. }) => PhaseAction::WriteDirect,
            (Precopy, Record::Zero { .. }) => PhaseAction::ZeroDirect,
            (Precopy, Record::Discard { .. }) => PhaseAction::Discard,
            (Precopy, Record::Postcopy) => {
                *self = Armed;
                PhaseAction::Arm
            }
            (Armed | Running, Record::Pages { .. }) => PhaseAction::Place,
            (Armed | Running, Record::Zero { .. }) => PhaseAction::PlaceZero,
            (Armed, Record::Run) => {
                *self = Running;
                PhaseAction::Run
            }
            (Running, Record::Digests { .. }) => PhaseAction::StoreDigests,
            (Running, Record::End) => {
                *self = Ended;
                PhaseAction::End
            }
            (phase, r) => {
                return Err(ProtocolError::UnexpectedRecord {
                    record: r.name(),
                    phase: phase.name(),
                })
            }
        };
        Ok(action)
    }

    /// Checks a record read from the urgent channel while the main channel is in `self`.
    pub fn on_urgent(self, record: &Record) -> Result<PhaseAction, ProtocolError> {
        match (self, record) {
            (_, Record::Ping) => Ok(PhaseAction::Nothing),
            (p, Record::Pages { .. }) if p.is_postcopy() || p == DestPhase::Ended => {
                Ok(PhaseAction::Place)
            }
            (p, Record::Zero { .. }) if p.is_postcopy() || p == DestPhase::Ended => {
                Ok(PhaseAction::PlaceZero)
            }
            (phase, r) => Err(ProtocolError::UnexpectedRecord {
                record: r.name(),
                phase: phase.name(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: Record = Record::Pages {
        region: 0,
        offset: 0,
        len: 4096,
    };

    #[test]
    fn happy_path() {
        let mut p = DestPhase::Precopy;
        assert_eq!(p.on_main(&PAGE).unwrap(), PhaseAction::WriteDirect);
        assert_eq!(
            p.on_main(&Record::Discard { count: 1 }).unwrap(),
            PhaseAction::Discard
        );
        assert_eq!(p.on_main(&Record::Postcopy).unwrap(), PhaseAction::Arm);
        assert_eq!(p.on_main(&PAGE).unwrap(), PhaseAction::Place);
        assert_eq!(p.on_main(&Record::Run).unwrap(), PhaseAction::Run);
        assert_eq!(p.on_urgent(&PAGE).unwrap(), PhaseAction::Place);
        assert_eq!(
            p.on_main(&Record::Digests {
                region: 0,
                offset: 0,
                count: 1
            })
            .unwrap(),
            PhaseAction::StoreDigests
        );
        assert_eq!(p.on_main(&Record::End).unwrap(), PhaseAction::End);
        assert_eq!(p, DestPhase::Ended);
    }

    #[test]
    fn out_of_order_records_are_errors() {
        let mut p = DestPhase::Precopy;
        assert!(p.on_main(&Record::Run).is_err());
        assert!(p.on_main(&Record::End).is_err());
        assert!(p.on_urgent(&PAGE).is_err());
        p.on_main(&Record::Postcopy).unwrap();
        assert!(p.on_main(&Record::Discard { count: 1 }).is_err());
        assert!(p.on_main(&Record::Postcopy).is_err());
        assert!(p.on_urgent(&Record::Run).is_err());
        p.on_main(&Record::Run).unwrap();
        p.on_main(&Record::End).unwrap();
        assert!(p.on_main(&PAGE).is_err());
        assert_eq!(
            p.on_main(&Record::Ping).unwrap(),
            PhaseAction::Nothing,
            "pings outlive End"
        );
    }
}
