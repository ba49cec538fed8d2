//! crm-analytics: live, exact sales analytics from a PostgreSQL CRM.
//!
//! The stages, one module each: [`capture`] (outbox and triggers in the CRM database),
//! [`relay`] (outbox to queue), [`queue`] (the transport, PostgreSQL by default), [`worker`]
//! (exactly-once application), [`aggregates`] (the metrics), [`archive`] (raw events in an
//! object store), [`replay`] (the aggregates rebuilt from the archive), [`backfill`]
//! (recomputation from a snapshot), and the [`cli`].

pub mod aggregates;
pub mod api;
pub mod archive;
pub mod backfill;
pub mod capture;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod db;
pub mod event;
pub mod listen;
pub mod maintenance;
pub mod migrate;
pub mod pipeline;
pub mod queue;
pub mod relay;
pub mod replay;
pub mod status;
pub mod telemetry;
pub mod worker;
pub mod workload;
