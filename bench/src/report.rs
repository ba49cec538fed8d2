//! The benchmark report: a table on the terminal and BENCHMARKS.md, with the machine it
//! ran on and, for every target, whether it is met.

use anyhow::Context as _;
use std::fmt::Write as _;
use std::path::Path;

use super::plot::Plot;
use super::Scale;

/// Everything from this line on in BENCHMARKS.md is kept when the report is rewritten.
pub const ANALYSIS_MARKER: &str = "<!-- analysis: kept across runs -->";
/// Plots go to this folder beside the report.
const PLOT_DIR: &str = "benchmarks";

#[derive(Debug, Clone)]
pub struct Measurement {
    pub section: &'static str,
    pub name: String,
    pub value: String,
    /// The target, as text, and whether it is met; None for context rows.
    pub target: Option<(String, bool)>,
}

pub struct Report {
    quick: bool,
    scale: Scale,
    /// The PostgreSQL server measured, as found at the start of the run.
    server: String,
    rows: Vec<Measurement>,
    plots: Vec<(&'static str, Plot)>,
}

impl Report {
    pub fn new(quick: bool, scale: Scale, server: String) -> Self {
        Self {
            quick,
            scale,
            server,
            rows: Vec::new(),
            plots: Vec::new(),
        }
    }

    pub fn add(
        &mut self,
        section: &'static str,
        name: impl Into<String>,
        value: impl Into<String>,
        target: Option<(String, bool)>,
    ) {
        let m = Measurement {
            section,
            name: name.into(),
            value: value.into(),
            target,
        };
        println!(
            "  {:<58} {:>22}  {}",
            m.name,
            m.value,
            m.target
                .as_ref()
                .map(|(t, ok)| format!("{} {t}", if *ok { "met" } else { "MISSED" }))
                .unwrap_or_default()
        );
        self.rows.push(m);
    }

    /// A chart shown under the table of `section`.
    pub fn add_plot(&mut self, section: &'static str, plot: Plot) {
        println!("  (plot: {})", plot.caption);
        self.plots.push((section, plot));
    }

    pub fn print(&self) {
        let met = self
            .rows
            .iter()
            .filter(|r| matches!(r.target, Some((_, true))))
            .count();
        let all = self.rows.iter().filter(|r| r.target.is_some()).count();
        println!("targets met: {met} of {all}");
    }

    fn machine(&self) -> String {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines().next().map(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .unwrap_or("0")
                        .parse::<u64>()
                        .unwrap_or(0)
                })
            })
            .map(|kb| format!("{:.0} GiB", kb as f64 / 1_048_576.0))
            .unwrap_or_default();
        format!("{cores} cores ({cpu}), {memory} memory; {}", self.server)
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let mut md = String::new();
        let _ = writeln!(md, "# Benchmarks\n");
        let _ = writeln!(
            md,
            "Produced by `crm-analytics-bench{}` on {}. Machine: {}.\n",
            if self.quick { " --quick" } else { "" },
            chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
            self.machine()
        );
        let _ = writeln!(
            md,
            "Sizes: backlog {} events (drained, and replayed from its archive), bulk statement {} rows, OLTP runs of {} s, freshness run of {} s, \
             materialized views at {:?} CRM rows with {} CRM transactions each, steady run of {} s, \
             scale-out backlog {} events; through the queue backends a backlog of {} events ({} \
             through SQS, each drain watched for at most {} s), freshness runs of {} s and a \
             scale-out backlog of {} events ({} through SQS). \
             Every comparison ran side by side in this run; ratios matter more than absolute numbers, \
             which drift on a shared machine.\n",
            self.scale.backlog, self.scale.bulk_rows, self.scale.oltp_seconds, self.scale.freshness_seconds,
            self.scale.mv_sizes, self.scale.mv_changes, self.scale.steady_seconds,
            self.scale.scale_out_backlog, self.scale.queues_backlog, self.scale.queues_sqs_backlog,
            self.scale.queues_drain_cap_seconds, self.scale.queues_freshness_seconds, self.scale.queues_scale_out_backlog,
            self.scale.queues_sqs_scale_out_backlog
        );
        let plot_dir = path.parent().unwrap_or(Path::new("")).join(PLOT_DIR);
        let mut sections: Vec<&'static str> = Vec::new();
        for row in &self.rows {
            if !sections.contains(&row.section) {
                sections.push(row.section);
            }
        }
        for section in sections {
            let _ = writeln!(
                md,
                "\n## {section}\n\n| measurement | value | target |\n|---|---:|---|"
            );
            for row in self.rows.iter().filter(|r| r.section == section) {
                let target = match &row.target {
                    Some((t, true)) => format!("met: {t}"),
                    Some((t, false)) => format!("**missed**: {t}"),
                    None => String::new(),
                };
                let _ = writeln!(md, "| {} | {} | {} |", row.name, row.value, target);
            }
            for (_, plot) in self.plots.iter().filter(|(s, _)| *s == section) {
                let file = plot_dir.join(&plot.file);
                std::fs::create_dir_all(&plot_dir)
                    .and_then(|()| std::fs::write(&file, &plot.svg))
                    .with_context(|| format!("cannot write the plot {}", file.display()))?;
                let _ = writeln!(md, "\n![{}]({PLOT_DIR}/{})", plot.caption, plot.file);
            }
        }
        // Hand-written analysis below the marker survives a new run.
        if let Ok(previous) = std::fs::read_to_string(path) {
            if let Some(at) = previous.find(ANALYSIS_MARKER) {
                let _ = write!(md, "\n{}", &previous[at..]);
            }
        }
        if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(folder)
                .with_context(|| format!("cannot create the folder {}", folder.display()))?;
        }
        std::fs::write(path, md)
            .with_context(|| format!("cannot write the report {}", path.display()))?;
        Ok(())
    }
}
