//! Bad configuration is refused with a clear error before anything connects.

use std::sync::Arc;

use migrate_core::workload::Access;
use migrate_core::{MigrateError, Mode, Source};
use migrate_tests::{loopback_listener, memory, migrate_source, Case};

/// A pacing fraction that would cap the bulk socket at zero (or NaN) would stall the
/// migration: it is refused.
#[test]
fn a_pacing_fraction_of_zero_is_refused() {
    let case = Case::small(Mode::PreemptFull, Access::Random);
    let mem = Arc::new(memory(&case));
    let (_listener, ep) = loopback_listener();
    for bad in [0.0, -1.0, f64::NAN] {
        let mut cfg = case.source_config();
        cfg.adaptive_pacing = Some(bad);
        let source = Source::new(mem.clone(), cfg);
        let err = migrate_source(&source, &case, mem.clone(), &ep)
            .expect_err("a zero pacing fraction was accepted");
        assert!(
            matches!(&err, MigrateError::Config(m) if m.contains("adaptive_pacing")),
            "{bad}: {err}"
        );
    }
}
