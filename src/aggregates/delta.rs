//! Incremental deltas: an event contributes (new row) minus (old row) to every metric.
//!
//! Pure functions, no I/O. Because each row image contributes independently and addition
//! commutes, events may be applied in any order and in any batches, and the sum over all
//! events equals the metrics of the current rows.

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use uuid::Uuid;

use super::rows::{ChangeEvent, LeadStatus, ProjectStatus, RowImage};
use crate::event::{CrmTable, Operation};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DailyDelta {
    pub leads_created: i64,
    pub leads_converted: i64,
    pub activities: i64,
    pub deals_won: i64,
    pub revenue_won: Decimal,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FunnelDelta {
    pub new: i64,
    pub contacted: i64,
    pub qualified: i64,
    pub converted: i64,
    pub lost: i64,
    pub total: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevenueDelta {
    pub deals_won: i64,
    pub revenue: Decimal,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CountDelta {
    pub processed: i64,
    pub failed: i64,
}

/// Key of `event_counts`: the event's UTC date, its table and its operation.
pub type CountKey = (NaiveDate, CrmTable, Operation);

/// Key of `daily_account_metrics` and `revenue_metrics`: account and day (or month).
/// `None` is a NULL in the CRM row, counted as a group of its own, as SQL's GROUP BY does.
pub type AccountKey = (Option<Uuid>, Option<NaiveDate>);
/// Key of `lead_funnel_metrics`: cohort date and source, either possibly NULL.
pub type FunnelKey = (Option<NaiveDate>, Option<String>);

/// The summed change of every aggregate over a set of events. Keys are kept sorted so that
/// concurrent workers lock aggregate rows in the same order and cannot deadlock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deltas {
    pub daily: BTreeMap<AccountKey, DailyDelta>,
    pub funnel: BTreeMap<FunnelKey, FunnelDelta>,
    pub revenue: BTreeMap<AccountKey, RevenueDelta>,
    pub counts: BTreeMap<CountKey, CountDelta>,
}

/// The UTC date of `at`; NULL stays NULL.
pub fn utc_date(at: Option<DateTime<Utc>>) -> Option<NaiveDate> {
    at.map(|at| at.date_naive())
}

/// First day of the month of `at`, the key of `revenue_metrics`; NULL stays NULL.
pub fn month_start(at: Option<DateTime<Utc>>) -> Option<NaiveDate> {
    at.map(|at| {
        let date = at.date_naive();
        date.with_day(1).unwrap_or(date)
    })
}

impl Deltas {
    /// Adds an event's metric contribution (not its processing count).
    pub fn add_event(&mut self, event: &ChangeEvent) {
        if let Some(old) = &event.old {
            self.add_row(old, -1);
        }
        if let Some(new) = &event.new {
            self.add_row(new, 1);
        }
    }

    /// Counts an event as processed in `event_counts`.
    pub fn count_processed(&mut self, event: &ChangeEvent) {
        self.counts
            .entry((event.date(), event.table, event.operation))
            .or_default()
            .processed += 1;
    }

    /// Adds `sign` times one row's contribution to every metric it takes part in.
    pub fn add_row(&mut self, row: &RowImage, sign: i64) {
        match row {
            RowImage::Account => {}
            RowImage::Lead(lead) => {
                let account = lead.account_id;
                self.daily
                    .entry((account, utc_date(lead.created_at)))
                    .or_default()
                    .leads_created += sign;
                if lead.status == Some(LeadStatus::Converted) {
                    self.daily
                        .entry((account, utc_date(lead.converted_at)))
                        .or_default()
                        .leads_converted += sign;
                }
                let funnel = self
                    .funnel
                    .entry((utc_date(lead.created_at), lead.source.clone()))
                    .or_default();
                funnel.total += sign;
                // A NULL status counts in `total` only, as count(*) FILTER does in SQL.
                if let Some(status) = lead.status {
                    *match status {
                        LeadStatus::New => &mut funnel.new,
                        LeadStatus::Contacted => &mut funnel.contacted,
                        LeadStatus::Qualified => &mut funnel.qualified,
                        LeadStatus::Converted => &mut funnel.converted,
                        LeadStatus::Lost => &mut funnel.lost,
                    } += sign;
                }
            }
            RowImage::Project(project) => {
                if project.status != Some(ProjectStatus::Won) {
                    return;
                }
                let account = project.account_id;
                // A won deal without amount is a deal won for nothing, as the
                // recomputation's coalesce(amount, 0) counts it.
                let amount = project.amount.unwrap_or(Decimal::ZERO) * Decimal::from(sign);
                let daily = self
                    .daily
                    .entry((account, utc_date(project.closed_at)))
                    .or_default();
                daily.deals_won += sign;
                daily.revenue_won += amount;
                let revenue = self
                    .revenue
                    .entry((account, month_start(project.closed_at)))
                    .or_default();
                revenue.deals_won += sign;
                revenue.revenue += amount;
            }
            RowImage::Activity(activity) => {
                self.daily
                    .entry((activity.account_id, utc_date(activity.occurred_at)))
                    .or_default()
                    .activities += sign;
            }
        }
    }

    /// Adds `other` into `self`, as two transactions applied one after the other would.
    pub fn merge(&mut self, other: Deltas) {
        for (key, d) in other.daily {
            let e = self.daily.entry(key).or_default();
            e.leads_created += d.leads_created;
            e.leads_converted += d.leads_converted;
            e.activities += d.activities;
            e.deals_won += d.deals_won;
            e.revenue_won += d.revenue_won;
        }
        for (key, d) in other.funnel {
            let e = self.funnel.entry(key).or_default();
            e.new += d.new;
            e.contacted += d.contacted;
            e.qualified += d.qualified;
            e.converted += d.converted;
            e.lost += d.lost;
            e.total += d.total;
        }
        for (key, d) in other.revenue {
            let e = self.revenue.entry(key).or_default();
            e.deals_won += d.deals_won;
            e.revenue += d.revenue;
        }
        for (key, d) in other.counts {
            let e = self.counts.entry(key).or_default();
            e.processed += d.processed;
            e.failed += d.failed;
        }
    }

    /// Drops entries whose every field nets to zero: they would change nothing.
    pub fn prune_zeros(&mut self) {
        self.daily.retain(|_, d| *d != DailyDelta::default());
        self.funnel.retain(|_, d| *d != FunnelDelta::default());
        self.revenue.retain(|_, d| *d != RevenueDelta::default());
        self.counts.retain(|_, d| *d != CountDelta::default());
    }
}
