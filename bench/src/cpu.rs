//! Where the CPU went during a measurement, so that a missed target says what limits it:
//! the machine's busy and idle time (`/proc/stat`), the CPU time of the processes under
//! test (`/proc/<pid>/stat`) and that of every PostgreSQL server process on this machine
//! (backends, WAL writer, checkpointer, autovacuum). Linux only: elsewhere, or with
//! PostgreSQL on another machine, the parts that cannot be read are reported as unknown.

use std::collections::HashMap;
use std::time::Instant;

/// CPU counters at one moment.
pub struct Sample {
    at: Instant,
    /// (busy, idle) clock ticks of all cores since boot.
    machine: Option<(u64, u64)>,
    /// Ticks used so far by each PostgreSQL process alive now.
    postgres: HashMap<u32, u64>,
}

/// What the CPU did between two samples, in cores (1.0 = one core busy all the time).
#[derive(Debug, Clone, Copy)]
pub struct Split {
    pub seconds: f64,
    pub cores: usize,
    /// Busy cores on average, whoever used them.
    pub busy: Option<f64>,
    /// PostgreSQL's processes.
    pub postgres: Option<f64>,
}

impl Split {
    /// `crm-analytics run` (or whoever is measured: `ours`, in cores), PostgreSQL and the
    /// idle cores, each also per `unit` (`count` of them happened), as a report value.
    pub fn describe(&self, ours: Option<(&str, f64)>, count: f64, unit: &str) -> String {
        let per_event = |cores: f64| cores * self.seconds / count.max(1.0) * 1e6;
        let mut parts = Vec::new();
        if let Some((who, cores)) = ours {
            parts.push(format!(
                "{who} {cores:.2} cores ({:.1} µs/{unit})",
                per_event(cores)
            ));
        }
        match self.postgres {
            Some(cores) => parts.push(format!(
                "PostgreSQL {cores:.2} cores ({:.1} µs/{unit})",
                per_event(cores)
            )),
            None => parts.push("PostgreSQL not on this machine".into()),
        }
        if let Some(busy) = self.busy {
            parts.push(format!(
                "idle {:.2} of {} cores",
                (self.cores as f64 - busy).max(0.0),
                self.cores
            ));
        }
        parts.join(", ")
    }
}

/// Clock ticks per second of the `/proc` counters.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

pub fn sample() -> Sample {
    Sample {
        at: Instant::now(),
        machine: machine_ticks(),
        postgres: postgres_ticks(),
    }
}

impl Sample {
    /// What the CPU did from this sample until now.
    pub fn split(&self) -> Split {
        let now = sample();
        let seconds = now.at.duration_since(self.at).as_secs_f64();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let tick = ticks_per_second();
        let busy = match (self.machine, now.machine) {
            (Some((b0, i0)), Some((b1, i1))) if b1 + i1 > b0 + i0 => {
                Some(cores as f64 * b1.saturating_sub(b0) as f64 / ((b1 + i1) - (b0 + i0)) as f64)
            }
            _ => None,
        };
        // A process that started since counts from zero; one that ended is lost (the
        // connections under test stay open until the measurement ends).
        let postgres = (!now.postgres.is_empty()).then(|| {
            let used: u64 = now
                .postgres
                .iter()
                .map(|(pid, ticks)| ticks.saturating_sub(*self.postgres.get(pid).unwrap_or(&0)))
                .sum();
            used as f64 / tick / seconds.max(f64::EPSILON)
        });
        Split {
            seconds,
            cores,
            busy,
            postgres,
        }
    }
}

/// A window over which the machine's CPU is split and the CPU of some processes (ours:
/// `crm-analytics run`, or this process for a baseline's client side) is measured.
pub struct Window {
    machine: Sample,
    /// What the measured processes had used at the start (None: unreadable).
    processes_at_start: Option<f64>,
}

impl Window {
    /// Starts now. `pids`: the measured processes that already run (None: gone); those
    /// started later count from zero.
    pub fn start(pids: &[Option<u32>]) -> Self {
        Self {
            processes_at_start: processes_seconds(pids),
            machine: sample(),
        }
    }

    /// The split since the start, and what `pids` used over it, in cores (None when one
    /// of them cannot be read).
    pub fn finish(&self, pids: &[Option<u32>]) -> (Split, Option<f64>) {
        let split = self.machine.split();
        let cores = self
            .processes_at_start
            .zip(processes_seconds(pids))
            .map(|(before, after)| (after - before) / split.seconds.max(f64::EPSILON));
        (split, cores)
    }
}

/// CPU seconds `pids` have used so far together; None if one of them cannot be read.
fn processes_seconds(pids: &[Option<u32>]) -> Option<f64> {
    pids.iter().map(|pid| pid.and_then(process_seconds)).sum()
}

/// CPU seconds a process has used so far (user and system), if it can be read.
pub fn process_seconds(pid: u32) -> Option<f64> {
    Some(process_ticks(pid)? as f64 / ticks_per_second())
}

/// utime + stime of `/proc/<pid>/stat` (fields 14 and 15, counted after the command name,
/// which may hold spaces and ends at the last ')').
fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The first line of `/proc/stat`: busy (user, nice, system, irq, softirq, steal) and
/// idle (idle, iowait) ticks.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let n: Vec<u64> = line
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| n.get(i).copied().unwrap_or(0);
    Some((at(0) + at(1) + at(2) + at(5) + at(6) + at(7), at(3) + at(4)))
}

/// Ticks of every process named `postgres` (the server's processes keep that name).
fn postgres_ticks() -> HashMap<u32, u64> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == "postgres")
        })
        .filter_map(|pid| Some((pid, process_ticks(pid)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_and_the_machine() {
        let start = sample();
        // Work for a while, so that the counters (in ticks of 10 ms) move.
        let busy_until = Instant::now() + std::time::Duration::from_millis(200);
        let mut x = 0u64;
        while Instant::now() < busy_until {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        assert!(process_seconds(std::process::id()).is_some_and(|s| s > 0.0));
        let split = start.split();
        assert!(split
            .busy
            .is_some_and(|b| b > 0.0 && b <= split.cores as f64 + 0.01));
    }
}
