//! Where a push's time goes: the wall-clock time during which at least one task of each
//! phase was under way. Phases overlap (one layer uploads while the next compresses), so
//! their sum may exceed the push's time; each one alone says how long that kind of work
//! kept the push busy.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A push's time per phase.
// pub: used by publish and tests/it
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushPhases {
    /// Reading the archive and hashing what was read (the layers' bytes included).
    pub read: Duration,
    /// Compressing layers.
    pub compress: Duration,
    /// Checking for, mounting and uploading blobs.
    pub upload: Duration,
    /// Putting the manifest (and tags).
    pub manifest: Duration,
}

impl PushPhases {
    /// `read/hash 0.12 s, compress 1.30 s, upload 0.80 s, manifest 0.01 s`.
    pub fn describe(&self) -> String {
        let s = |d: Duration| format!("{:.2} s", d.as_secs_f64());
        format!(
            "read/hash {}, compress {}, upload {}, manifest {}",
            s(self.read),
            s(self.compress),
            s(self.upload),
            s(self.manifest)
        )
    }

    /// Adds another push's phases (the images of an index, one after the other).
    pub fn add(&mut self, other: &PushPhases) {
        self.read += other.read;
        self.compress += other.compress;
        self.upload += other.upload;
        self.manifest += other.manifest;
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Phase {
    Read,
    Compress,
    Upload,
    Manifest,
}

#[derive(Debug, Default)]
struct Span {
    active: usize,
    since: Option<Instant>,
    total: Duration,
}

/// Counts, per phase, the time during which any task of it runs.
#[derive(Debug, Default)]
pub(crate) struct PhaseClock {
    spans: Mutex<[Span; 4]>,
}

/// One task in a phase; leaves it when dropped.
pub(crate) struct InPhase<'a> {
    clock: &'a PhaseClock,
    phase: Phase,
}

impl PhaseClock {
    pub(crate) fn enter(&self, phase: Phase) -> InPhase<'_> {
        if let Ok(mut spans) = self.spans.lock() {
            let span = &mut spans[phase as usize];
            if span.active == 0 {
                span.since = Some(Instant::now());
            }
            span.active += 1;
        }
        InPhase { clock: self, phase }
    }

    fn leave(&self, phase: Phase) {
        if let Ok(mut spans) = self.spans.lock() {
            let span = &mut spans[phase as usize];
            span.active = span.active.saturating_sub(1);
            if span.active == 0 {
                if let Some(since) = span.since.take() {
                    span.total += since.elapsed();
                }
            }
        }
    }

    /// The time counted so far (tasks still under way count up to now).
    pub(crate) fn phases(&self) -> PushPhases {
        let Ok(spans) = self.spans.lock() else { return PushPhases::default() };
        let total = |p: Phase| {
            let span = &spans[p as usize];
            span.total + span.since.map_or(Duration::ZERO, |s| s.elapsed())
        };
        PushPhases {
            read: total(Phase::Read),
            compress: total(Phase::Compress),
            upload: total(Phase::Upload),
            manifest: total(Phase::Manifest),
        }
    }
}

impl Drop for InPhase<'_> {
    fn drop(&mut self) {
        self.clock.leave(self.phase);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_tasks_count_once() {
        let clock = PhaseClock::default();
        {
            let _a = clock.enter(Phase::Upload);
            let _b = clock.enter(Phase::Upload);
            std::thread::sleep(Duration::from_millis(20));
        }
        let phases = clock.phases();
        assert!(phases.upload >= Duration::from_millis(20), "{phases:?}");
        assert_eq!(phases.read, Duration::ZERO);
        let before = clock.phases().upload;
        assert_eq!(clock.phases().upload, before, "nothing under way: the count stands still");
    }
}
