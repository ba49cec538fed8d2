//! The /api/ endpoints: each validates its filters, counts, and reads one page of one
//! aggregate table with bound parameters, ordered by the table's key columns.

use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, Uri};
use axum::{Extension, Json};
use chrono::NaiveDate;
use rust_decimal::Decimal;
use sqlx::{Postgres, QueryBuilder};
use utoipa::IntoParams;
use uuid::Uuid;

use super::error::ApiError;
use super::models::*;
use super::query::{Links, Page, Params};
use super::AppState;
use crate::event::CrmTable;

/// Filters of one list, as SQL conditions with bound values.
#[derive(Default)]
struct Filters {
    conditions: Vec<(&'static str, Value)>,
}

enum Value {
    Date(NaiveDate),
    Uuid(Uuid),
    Text(String),
    /// A condition with no parameter (`... IS NULL`).
    Nothing,
}

impl Filters {
    fn add<T>(&mut self, sql: &'static str, value: Option<T>, wrap: fn(T) -> Value) {
        if let Some(v) = value {
            self.conditions.push((sql, wrap(v)));
        }
    }

    /// `<column>__isnull=true|false` (django-filter's lookup): rows whose `column` is NULL,
    /// or is not. `column` is one of ours, never taken from the request.
    fn add_isnull(
        &mut self,
        params: &Params,
        (param, is_null, is_not_null): (&str, &'static str, &'static str),
    ) -> Result<(), ApiError> {
        match params.one_of(param, &["true", "false"])?.as_deref() {
            Some("true") => self.conditions.push((is_null, Value::Nothing)),
            Some(_) => self.conditions.push((is_not_null, Value::Nothing)),
            None => {}
        }
        Ok(())
    }

    fn push_where(&self, q: &mut QueryBuilder<'_, Postgres>) {
        q.push(" WHERE true");
        for (sql, value) in &self.conditions {
            q.push(" AND ").push(*sql);
            match value {
                Value::Date(d) => q.push_bind(*d),
                Value::Uuid(u) => q.push_bind(*u),
                Value::Text(t) => q.push_bind(t.clone()),
                Value::Nothing => q,
            };
        }
    }
}

/// Reads one page of the filtered rows of `table` and their total count, in one query
/// (a window count) unless the page is past the end.
async fn page_of<T>(
    state: &AppState,
    table: &str,
    columns: &str,
    order: &str,
    filters: &Filters,
    page: Page,
) -> Result<(i64, Vec<T>), ApiError>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    use sqlx::Row;
    let mut rows = QueryBuilder::new(format!(
        "SELECT {columns}, count(*) OVER () AS total_rows FROM {table}"
    ));
    filters.push_where(&mut rows);
    rows.push(format!(" ORDER BY {order} LIMIT "))
        .push_bind(page.limit)
        .push(" OFFSET ")
        .push_bind(page.offset);
    let fetched = rows.build().fetch_all(&state.analytics).await?;
    let total = match fetched.first() {
        Some(first) => first.try_get::<i64, _>("total_rows")?,
        None => {
            let mut count = QueryBuilder::new(format!("SELECT count(*) FROM {table}"));
            filters.push_where(&mut count);
            count
                .build_query_scalar()
                .fetch_one(&state.analytics)
                .await?
        }
    };
    // Tuples decode by position, so the trailing total_rows column is ignored.
    let results = fetched
        .iter()
        .map(T::from_row)
        .collect::<Result<Vec<T>, _>>()?;
    Ok((total, results))
}

/// Filters of GET /api/daily-metrics/.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct DailyQuery {
    /// One day, YYYY-MM-DD (instead of from/to).
    #[param(format = Date, nullable = false)]
    date: Option<String>,
    /// First day, inclusive, YYYY-MM-DD; not later than `to`.
    #[param(format = Date, nullable = false)]
    from: Option<String>,
    /// Last day, inclusive, YYYY-MM-DD.
    #[param(format = Date, nullable = false)]
    to: Option<String>,
    #[param(nullable = false)]
    account_id: Option<Uuid>,
    /// true: only rows without an account (account_id null); false: only rows with one.
    #[param(rename = "account_id__isnull", nullable = false)]
    account_id_isnull: Option<bool>,
    /// Page size, default 100; larger values count as 1000.
    #[param(minimum = 1, maximum = 9223372036854775807_i64, nullable = false)]
    limit: Option<i64>,
    /// Rows to skip, at most 10^12.
    #[param(minimum = 0, maximum = 1_000_000_000_000_i64, nullable = false)]
    offset: Option<i64>,
}

/// Account-level daily rollups.
#[utoipa::path(get, path = "/api/daily-metrics/", params(DailyQuery),
    responses((status = 200, body = DailyMetricPage), (status = 400, body = ErrorDetail), (status = 401, body = ErrorDetail)),
    security(("bearer" = [])))]
pub async fn daily_metrics(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    uri: Uri,
    Extension(links): Extension<Links>,
) -> Result<Json<DailyMetricPage>, ApiError> {
    let params = Params::parse(query.as_deref());
    let page = params.page()?;
    let date = params.date("date")?;
    let (from, to) = params.range(Params::date)?;
    if date.is_some() && (from.is_some() || to.is_some()) {
        return Err(ApiError::BadRequest(
            "use either date or from/to, not both".into(),
        ));
    }
    let mut filters = Filters::default();
    filters.add("date = ", date, Value::Date);
    filters.add("date >= ", from, Value::Date);
    filters.add("date <= ", to, Value::Date);
    filters.add("account_id = ", params.uuid("account_id")?, Value::Uuid);
    filters.add_isnull(
        &params,
        (
            "account_id__isnull",
            "account_id IS NULL",
            "account_id IS NOT NULL",
        ),
    )?;
    type Row = (Option<Uuid>, Option<NaiveDate>, i64, i64, i64, i64, Decimal);
    let (count, rows): (i64, Vec<Row>) = page_of(
        &state,
        "analytics.daily_account_metrics",
        "account_id, date, leads_created, leads_converted, activities, deals_won, revenue_won",
        "account_id, date",
        &filters,
        page,
    )
    .await?;
    let (next, previous) = page.links(count, &uri, &links);
    Ok(Json(DailyMetricPage {
        count,
        next,
        previous,
        results: rows
            .into_iter()
            .map(|(account_id, date, lc, lv, a, dw, rw)| DailyMetric {
                account_id,
                date,
                leads_created: lc,
                leads_converted: lv,
                activities: a,
                deals_won: dw,
                revenue_won: Money(rw),
            })
            .collect(),
    }))
}

/// Filters of GET /api/funnel-metrics/.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct FunnelQuery {
    /// First cohort date, inclusive, YYYY-MM-DD; not later than `to`.
    #[param(format = Date, nullable = false)]
    from: Option<String>,
    /// Last cohort date, inclusive, YYYY-MM-DD.
    #[param(format = Date, nullable = false)]
    to: Option<String>,
    /// Lead source, exactly; any text without NUL characters.
    #[param(max_length = 10000, pattern = r"^[^\x00]*$", nullable = false)]
    source: Option<String>,
    /// true: only leads without a source (source null); false: only leads with one.
    #[param(rename = "source__isnull", nullable = false)]
    source_isnull: Option<bool>,
    /// Page size, default 100; larger values count as 1000.
    #[param(minimum = 1, maximum = 9223372036854775807_i64, nullable = false)]
    limit: Option<i64>,
    /// Rows to skip, at most 10^12.
    #[param(minimum = 0, maximum = 1_000_000_000_000_i64, nullable = false)]
    offset: Option<i64>,
}

/// Lead conversion funnel by cohort (creation date) and source.
#[utoipa::path(get, path = "/api/funnel-metrics/", params(FunnelQuery),
    responses((status = 200, body = FunnelMetricPage), (status = 400, body = ErrorDetail), (status = 401, body = ErrorDetail)),
    security(("bearer" = [])))]
pub async fn funnel_metrics(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    uri: Uri,
    Extension(links): Extension<Links>,
) -> Result<Json<FunnelMetricPage>, ApiError> {
    let params = Params::parse(query.as_deref());
    let page = params.page()?;
    let (from, to) = params.range(Params::date)?;
    let mut filters = Filters::default();
    filters.add("cohort_date >= ", from, Value::Date);
    filters.add("cohort_date <= ", to, Value::Date);
    filters.add(
        "source = ",
        params.text("source")?.map(str::to_string),
        Value::Text,
    );
    filters.add_isnull(
        &params,
        ("source__isnull", "source IS NULL", "source IS NOT NULL"),
    )?;
    type Row = (
        Option<NaiveDate>,
        Option<String>,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
    );
    let (count, rows): (i64, Vec<Row>) = page_of(
        &state,
        "analytics.lead_funnel_metrics",
        "cohort_date, source, new, contacted, qualified, converted, lost, total",
        "cohort_date, source",
        &filters,
        page,
    )
    .await?;
    let (next, previous) = page.links(count, &uri, &links);
    Ok(Json(FunnelMetricPage {
        count,
        next,
        previous,
        results: rows
            .into_iter()
            .map(
                |(cohort_date, source, new, contacted, qualified, converted, lost, total)| {
                    FunnelMetric {
                        cohort_date,
                        source,
                        new,
                        contacted,
                        qualified,
                        converted,
                        lost,
                        total,
                        conversion_rate: if total > 0 {
                            converted as f64 / total as f64
                        } else {
                            0.0
                        },
                    }
                },
            )
            .collect(),
    }))
}

/// Filters of GET /api/revenue-metrics/.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct RevenueQuery {
    #[param(nullable = false)]
    account_id: Option<Uuid>,
    /// true: only deals without an account (account_id null); false: only deals with one.
    #[param(rename = "account_id__isnull", nullable = false)]
    account_id_isnull: Option<bool>,
    /// First month, inclusive, YYYY-MM; not later than `to`.
    #[param(pattern = r"^[0-9]{4}-(0[1-9]|1[0-2])$", nullable = false)]
    from: Option<String>,
    /// Last month, inclusive, YYYY-MM.
    #[param(pattern = r"^[0-9]{4}-(0[1-9]|1[0-2])$", nullable = false)]
    to: Option<String>,
    /// Page size, default 100; larger values count as 1000.
    #[param(minimum = 1, maximum = 9223372036854775807_i64, nullable = false)]
    limit: Option<i64>,
    /// Rows to skip, at most 10^12.
    #[param(minimum = 0, maximum = 1_000_000_000_000_i64, nullable = false)]
    offset: Option<i64>,
}

/// Revenue of won deals by account and month.
#[utoipa::path(get, path = "/api/revenue-metrics/", params(RevenueQuery),
    responses((status = 200, body = RevenueMetricPage), (status = 400, body = ErrorDetail), (status = 401, body = ErrorDetail)),
    security(("bearer" = [])))]
pub async fn revenue_metrics(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    uri: Uri,
    Extension(links): Extension<Links>,
) -> Result<Json<RevenueMetricPage>, ApiError> {
    let params = Params::parse(query.as_deref());
    let page = params.page()?;
    let (from, to) = params.range(Params::month)?;
    let mut filters = Filters::default();
    filters.add("account_id = ", params.uuid("account_id")?, Value::Uuid);
    filters.add("month >= ", from, Value::Date);
    filters.add("month <= ", to, Value::Date);
    filters.add_isnull(
        &params,
        (
            "account_id__isnull",
            "account_id IS NULL",
            "account_id IS NOT NULL",
        ),
    )?;
    type Row = (Option<Uuid>, Option<NaiveDate>, i64, Decimal);
    let (count, rows): (i64, Vec<Row>) = page_of(
        &state,
        "analytics.revenue_metrics",
        "account_id, month, deals_won, revenue",
        "account_id, month",
        &filters,
        page,
    )
    .await?;
    let (next, previous) = page.links(count, &uri, &links);
    Ok(Json(RevenueMetricPage {
        count,
        next,
        previous,
        results: rows
            .into_iter()
            .map(|(account_id, month, deals_won, revenue)| RevenueMetric {
                account_id,
                month: month.map(|m| m.format("%Y-%m").to_string()),
                deals_won,
                revenue: Money(revenue),
            })
            .collect(),
    }))
}

/// Filters of GET /api/event-counts/.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct EventCountQuery {
    /// First day, inclusive, YYYY-MM-DD; not later than `to`.
    #[param(format = Date, nullable = false)]
    from: Option<String>,
    /// Last day, inclusive, YYYY-MM-DD.
    #[param(format = Date, nullable = false)]
    to: Option<String>,
    /// accounts, leads, projects or activities.
    #[param(value_type = Option<TableName>, inline, nullable = false)]
    table: Option<String>,
    /// Page size, default 100; larger values count as 1000.
    #[param(minimum = 1, maximum = 9223372036854775807_i64, nullable = false)]
    limit: Option<i64>,
    /// Rows to skip, at most 10^12.
    #[param(minimum = 0, maximum = 1_000_000_000_000_i64, nullable = false)]
    offset: Option<i64>,
}

/// The CRM tables, as the `table` filter names them.
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
enum TableName {
    Accounts,
    Leads,
    Projects,
    Activities,
}

/// Processing health: processed and failed events by day, table and operation.
#[utoipa::path(get, path = "/api/event-counts/", params(EventCountQuery),
    responses((status = 200, body = EventCountPage), (status = 400, body = ErrorDetail), (status = 401, body = ErrorDetail)),
    security(("bearer" = [])))]
pub async fn event_counts(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    uri: Uri,
    Extension(links): Extension<Links>,
) -> Result<Json<EventCountPage>, ApiError> {
    let params = Params::parse(query.as_deref());
    let page = params.page()?;
    let (from, to) = params.range(Params::date)?;
    let tables = CrmTable::ALL.map(CrmTable::name);
    let mut filters = Filters::default();
    filters.add("date >= ", from, Value::Date);
    filters.add("date <= ", to, Value::Date);
    filters.add(
        "table_name = ",
        params.one_of("table", &tables)?,
        Value::Text,
    );
    type Row = (NaiveDate, String, String, i64, i64);
    let (count, rows): (i64, Vec<Row>) = page_of(
        &state,
        "analytics.event_counts",
        "date, table_name, operation, processed, failed",
        "date, table_name, operation",
        &filters,
        page,
    )
    .await?;
    let (next, previous) = page.links(count, &uri, &links);
    Ok(Json(EventCountPage {
        count,
        next,
        previous,
        results: rows
            .into_iter()
            .map(|(date, table, operation, processed, failed)| EventCount {
                date,
                table,
                operation,
                processed,
                failed,
            })
            .collect(),
    }))
}

/// Pipeline health: the original design's monitoring points, and which database or queue
/// is unreachable (503) when one is.
#[utoipa::path(get, path = "/api/health/",
    responses((status = 200, body = Health), (status = 401, body = ErrorDetail),
              (status = 503, description = "a database or the queue is unreachable; the others' numbers are still given", body = Health)),
    security(("bearer" = [])))]
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let report = crate::status::Report::read(&state.crm, &state.analytics, &*state.queue).await;
    let state_of = |read: Result<(), &crate::status::Unread>| match read {
        Ok(()) => "up",
        Err(unread) => unread.state(),
    };
    let analytics = report.analytics.as_ref().ok();
    let depth = report.queue.as_ref().ok();
    let latency = analytics.and_then(|a| a.latency_ms.as_ref());
    let health = Health {
        outbox_lag: report.crm.as_ref().ok().map(|lag| lag.events),
        queue_backend: report.queue_backend.clone(),
        queue_depth: depth.map(|d| d.events),
        queue_depth_approximate: depth.map(|d| d.approximate),
        failed_events: analytics.map(|a| a.failed_events),
        latency_ms: LatencyMs {
            p50: latency.map(|l| l.p50),
            p99: latency.map(|l| l.p99),
        },
        databases: DatabaseStates {
            crm: state_of(report.crm.as_ref().map(|_| ())),
            analytics: state_of(report.analytics.as_ref().map(|_| ())),
            queue: state_of(report.queue.as_ref().map(|_| ())),
        },
        detail: unreachable_detail(&report),
    };
    if let Err(error) = &report.crm {
        tracing::debug!(%error, state = error.state(), "health: the CRM side was not read");
    }
    if let Err(error) = &report.analytics {
        tracing::debug!(%error, state = error.state(), "health: the analytics side was not read");
    }
    if let Err(error) = &report.queue {
        tracing::debug!(%error, state = error.state(), backend = %report.queue_backend,
                        "health: the queue was not read");
    }
    let status = if report.all_reachable() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(health))
}

/// What did not answer, e.g. "unreachable database: analytics; unreachable queue:
/// postgres"; None when everything did.
pub(crate) fn unreachable_detail(report: &crate::status::Report) -> Option<String> {
    let mut parts = Vec::new();
    let databases = report.unreachable();
    if !databases.is_empty() {
        parts.push(format!("unreachable database: {}", databases.join(", ")));
    }
    if report.queue_unreachable() {
        parts.push(format!("unreachable queue: {}", report.queue_backend));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}
