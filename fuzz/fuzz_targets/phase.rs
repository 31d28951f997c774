//! A sequence of decoded records fed to `DestPhase::on_main` / `on_urgent`: never panics, the
//! phase only moves forward, and the actions match the phase rules (in particular nothing is
//! ever placed through the urgent channel before userfaultfd is armed).
#![no_main]

use libfuzzer_sys::fuzz_target;
use migrate_core::protocol::{DestPhase, PhaseAction, Record, RECORD_HEADER_LEN};
use migrate_fuzz::table;

fn rank(p: DestPhase) -> u8 {
    match p {
        DestPhase::Precopy => 0,
        DestPhase::Armed => 1,
        DestPhase::Running => 2,
        DestPhase::Ended => 3,
    }
}

fuzz_target!(|data: &[u8]| {
    let t = table();
    let mut phase = DestPhase::Precopy;
    // Each step: one selector byte (bit 0: urgent channel) and a 16-byte header.
    for step in data.chunks_exact(1 + RECORD_HEADER_LEN) {
        let hdr: [u8; RECORD_HEADER_LEN] = step[1..].try_into().unwrap();
        let Ok(rec) = Record::decode(&hdr, &t) else {
            continue;
        };
        let before = phase;
        if step[0] & 1 == 1 {
            match phase.on_urgent(&rec) {
                Ok(PhaseAction::Place) => {
                    assert!(matches!(rec, Record::Pages { .. }));
                    assert!(phase.is_postcopy() || phase == DestPhase::Ended);
                }
                Ok(PhaseAction::PlaceZero) => {
                    assert!(matches!(rec, Record::Zero { .. }));
                    assert!(phase.is_postcopy() || phase == DestPhase::Ended);
                }
                Ok(PhaseAction::Nothing) => assert_eq!(rec, Record::Ping),
                Ok(a) => panic!("urgent channel produced {a:?} for {rec:?}"),
                Err(_) => {}
            }
            continue;
        }
        match phase.on_main(&rec) {
            Ok(a) => {
                assert!(rank(phase) >= rank(before), "{before:?} -> {phase:?}");
                match a {
                    PhaseAction::WriteDirect | PhaseAction::ZeroDirect | PhaseAction::Discard => {
                        assert_eq!(before, DestPhase::Precopy)
                    }
                    PhaseAction::Place | PhaseAction::PlaceZero => assert!(before.is_postcopy()),
                    PhaseAction::Arm => {
                        assert_eq!((before, phase), (DestPhase::Precopy, DestPhase::Armed))
                    }
                    PhaseAction::Run => {
                        assert_eq!((before, phase), (DestPhase::Armed, DestPhase::Running))
                    }
                    PhaseAction::StoreDigests => assert_eq!(before, DestPhase::Running),
                    PhaseAction::End => {
                        assert_eq!((before, phase), (DestPhase::Running, DestPhase::Ended))
                    }
                    PhaseAction::Nothing => assert_eq!(rec, Record::Ping),
                }
            }
            Err(_) => assert_eq!(phase, before, "a rejected record must not move the phase"),
        }
    }
});
