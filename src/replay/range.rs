//! Which aggregate rows a date range owns, for `replay --from/--to`.
//!
//! A row is owned by the date in its key: a `daily_account_metrics` row by its `date` (the
//! day a lead was created or converted, an activity occurred, a deal was won), a
//! `lead_funnel_metrics` row by its `cohort_date` (the day its leads were created, however
//! late they changed status), a `revenue_metrics` row by its `month` when that month
//! overlaps the range (the whole month is recomputed). Rows with a NULL date belong to no
//! range: only a full replay recomputes them.

use chrono::{Datelike, NaiveDate};

use crate::aggregates::delta::Deltas;

/// Both ends included; a missing end is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateRange {
    pub from: Option<NaiveDate>,
    pub to: Option<NaiveDate>,
}

impl DateRange {
    fn holds(&self, date: NaiveDate) -> bool {
        self.from.is_none_or(|from| date >= from) && self.to.is_none_or(|to| date <= to)
    }

    /// Whether a daily or funnel row of `date` is owned.
    pub fn owns_day(&self, date: Option<NaiveDate>) -> bool {
        date.is_some_and(|d| self.holds(d))
    }

    /// Whether the revenue row of the month starting `month` is owned.
    pub fn owns_month(&self, month: Option<NaiveDate>) -> bool {
        let Some(month) = month else { return false };
        let from_month = self.from.map(|f| f.with_day(1).unwrap_or(f));
        from_month.is_none_or(|f| month >= f) && self.to.is_none_or(|to| month <= to)
    }

    /// The first day of the first owned month (the SQL bound of revenue rows).
    pub fn first_month(&self) -> Option<NaiveDate> {
        self.from.map(|f| f.with_day(1).unwrap_or(f))
    }

    /// Keeps in `deltas` only the rows this range owns (`owned`) or only those it does
    /// not (`!owned`). Event counts are left alone.
    pub fn retain(&self, deltas: &mut Deltas, owned: bool) {
        deltas
            .daily
            .retain(|(_, day), _| self.owns_day(*day) == owned);
        deltas
            .funnel
            .retain(|(day, _), _| self.owns_day(*day) == owned);
        deltas
            .revenue
            .retain(|(_, month), _| self.owns_month(*month) == owned);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).expect("date")
    }

    #[test]
    fn days_are_owned_inside_the_range_and_months_when_they_overlap_it() {
        let range = DateRange {
            from: Some(day(2026, 3, 15)),
            to: Some(day(2026, 4, 10)),
        };
        assert!(range.owns_day(Some(day(2026, 3, 15))) && range.owns_day(Some(day(2026, 4, 10))));
        assert!(!range.owns_day(Some(day(2026, 3, 14))) && !range.owns_day(Some(day(2026, 4, 11))));
        assert!(!range.owns_day(None));
        assert!(range.owns_month(Some(day(2026, 3, 1))) && range.owns_month(Some(day(2026, 4, 1))));
        assert!(
            !range.owns_month(Some(day(2026, 2, 1))) && !range.owns_month(Some(day(2026, 5, 1)))
        );
        assert!(!range.owns_month(None));
        let open = DateRange {
            from: None,
            to: Some(day(2026, 1, 1)),
        };
        assert!(open.owns_day(Some(day(1999, 1, 1))) && !open.owns_day(Some(day(2026, 1, 2))));
    }
}
