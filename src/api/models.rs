//! What the API returns: the result rows and their pages, with the JSON conventions of the
//! contract (money as a string with two decimals, dates YYYY-MM-DD, months YYYY-MM).

use chrono::NaiveDate;
use rust_decimal::Decimal;
use serde::{Serialize, Serializer};
use utoipa::ToSchema;
use uuid::Uuid;

/// An exact amount, serialized as a string with two decimals ("1234.50").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Money(pub Decimal);

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:.2}", self.0.round_dp(2)))
    }
}

impl utoipa::PartialSchema for Money {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some(r"^-?\d+\.\d{2}$"))
            .examples([serde_json::json!("1234.50")])
            .into()
    }
}
impl ToSchema for Money {}

// Key columns are null where the CRM row's column was NULL (a lead without account or
// source, a won deal without closed_at): such rows form a group of their own.

#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct DailyMetric {
    pub account_id: Option<Uuid>,
    #[schema(value_type = Option<String>, format = Date)]
    pub date: Option<NaiveDate>,
    pub leads_created: i64,
    pub leads_converted: i64,
    pub activities: i64,
    pub deals_won: i64,
    pub revenue_won: Money,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FunnelMetric {
    #[schema(value_type = Option<String>, format = Date)]
    pub cohort_date: Option<NaiveDate>,
    pub source: Option<String>,
    pub new: i64,
    pub contacted: i64,
    pub qualified: i64,
    pub converted: i64,
    pub lost: i64,
    pub total: i64,
    /// converted / total, between 0 and 1.
    pub conversion_rate: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RevenueMetric {
    pub account_id: Option<Uuid>,
    /// YYYY-MM
    #[schema(pattern = r"^\d{4}-\d{2}$")]
    pub month: Option<String>,
    pub deals_won: i64,
    pub revenue: Money,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventCount {
    #[schema(value_type = String, format = Date)]
    pub date: NaiveDate,
    pub table: String,
    pub operation: String,
    pub processed: i64,
    pub failed: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LatencyMs {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Events committed in the CRM, not yet handed to the queue (null: CRM unreachable).
    pub outbox_lag: Option<u64>,
    /// The queue's backend (CRM_ANALYTICS_QUEUE): "outbox", "postgres", "sqs" or "nats".
    pub queue_backend: String,
    /// Events in the queue, waiting or being applied (null: the queue did not answer).
    pub queue_depth: Option<u64>,
    /// Whether queue_depth is the broker's estimate (SQS) rather than a count.
    pub queue_depth_approximate: Option<bool>,
    /// Events parked in failed_events (null: analytics unreachable).
    pub failed_events: Option<u64>,
    /// Commit-to-applied latency over the last five minutes; null without events.
    pub latency_ms: LatencyMs,
    /// Whether each database and the queue answered: "up", "busy" (every connection of the
    /// process's pool was in use, its numbers are null; not an outage, no 503) or
    /// "unreachable" (the response is then a 503).
    pub databases: DatabaseStates,
    /// Which databases or queue are unreachable (the response is then a 503); null when none.
    pub detail: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DatabaseStates {
    /// The CRM database (outbox lag).
    pub crm: &'static str,
    /// The analytics database (failed events, latency).
    pub analytics: &'static str,
    /// The queue (its depth), a broker or the embedded queue in the analytics database:
    /// a broker that is down is reported here, not as the analytics database.
    pub queue: &'static str,
}

macro_rules! page {
    ($name:ident, $item:ty) => {
        /// A page of results with DRF's limit/offset links.
        #[derive(Debug, Serialize, ToSchema)]
        pub struct $name {
            pub count: i64,
            pub next: Option<String>,
            pub previous: Option<String>,
            pub results: Vec<$item>,
        }
    };
}

page!(DailyMetricPage, DailyMetric);
page!(FunnelMetricPage, FunnelMetric);
page!(RevenueMetricPage, RevenueMetric);
page!(EventCountPage, EventCount);

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub detail: String,
}
