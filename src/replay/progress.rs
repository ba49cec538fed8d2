//! Progress of a replay: a bar on a terminal (objects and events read, events/s, time
//! left), and a plain log line every LOG_EVERY objects for logs that are not one.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use super::ReplayReport;

/// Most objects between two progress lines in the logs (fewer in a small archive: ten
/// lines over the whole replay).
const LOG_EVERY: u64 = 1_000;

pub(super) struct Progress {
    bar: ProgressBar,
    total: u64,
    log_every: u64,
    objects: u64,
    events: u64,
    started: Instant,
}

fn target() -> ProgressDrawTarget {
    if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}

/// A spinner while the replay waits for in-flight batches to finish.
pub(super) fn waiting() -> ProgressBar {
    let bar =
        ProgressBar::with_draw_target(None, target()).with_message("waiting for in-flight batches");
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

impl Progress {
    pub fn start(total: u64) -> Self {
        let style = ProgressStyle::with_template(
            "{bar:30} {pos}/{len} objects, {msg} [{elapsed_precise}, {eta} left]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        let bar = ProgressBar::with_draw_target(Some(total), target()).with_style(style);
        tracing::info!(objects = total, "replaying the archive");
        Self {
            bar,
            total,
            log_every: (total / 10).clamp(1, LOG_EVERY),
            objects: 0,
            events: 0,
            started: Instant::now(),
        }
    }

    fn rate(&self) -> f64 {
        self.events as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    /// One object read, holding `events` events.
    pub fn object(&mut self, events: u64) {
        self.objects += 1;
        self.events += events;
        self.bar.inc(1);
        if self.objects.is_multiple_of(64) || self.objects == self.total {
            self.bar.set_message(format!(
                "{} events, {:.0} events/s",
                self.events,
                self.rate()
            ));
        }
        if self.objects.is_multiple_of(self.log_every) {
            tracing::info!(
                objects = self.objects,
                of = self.total,
                events = self.events,
                events_per_second = self.rate().round() as u64,
                "replay progress"
            );
        }
    }

    pub fn finish(&self, report: &ReplayReport) {
        self.bar.finish_and_clear();
        tracing::info!(
            objects = report.objects,
            events = report.events,
            duplicates = report.duplicates,
            parked = report.parked,
            waiting = report.waiting,
            claimed = report.claimed,
            events_per_second = self.rate().round() as u64,
            "archive read"
        );
    }
}
