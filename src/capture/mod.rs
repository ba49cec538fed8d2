//! Capture: the transactional outbox in the CRM database.
//!
//! Owns schema `crm_analytics` there (the `event_outbox` table and the trigger functions),
//! attaching row triggers to the four CRM tables, the TRUNCATE guard, and the reference CRM
//! schema that demos and tests create. A change and its outbox row commit or roll back together.
//! The trigger functions run as `crm_analytics_capture`, a role that may only append to the
//! outbox; row images carry every column or, with `metrics`, only what the metrics read.

pub mod wake;

use sqlx::PgPool;

use crate::event::CrmTable;
use crate::migrate::{self, Migration};

/// Migrations of the CRM database (component "capture").
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "event outbox and capture trigger functions",
        sql: include_str!("sql/001_outbox.sql"),
    },
    Migration {
        version: 2,
        description: "sequential event ids",
        sql: include_str!("sql/002_sequential_ids.sql"),
    },
    Migration {
        version: 3,
        description: "notifications only while a relay may be asleep",
        sql: include_str!("sql/003_quiet_when_busy.sql"),
    },
    Migration {
        version: 4,
        description: "trigger functions owned by a role with only capture's rights",
        sql: include_str!("sql/004_capture_role.sql"),
    },
    Migration {
        version: 5,
        description: "event ids that never repeat across restores, failovers and copies",
        sql: include_str!("sql/005_ids_across_restores.sql"),
    },
    Migration {
        version: 6,
        description: "the outbox as the queue: retry delay and last error",
        sql: include_str!("sql/006_outbox_as_queue.sql"),
    },
];

/// Owner of the trigger functions: may append to the outbox and read the sleep flag, no more.
pub const CAPTURE_ROLE: &str = "crm_analytics_capture";

/// Channel the capture triggers notify on commit.
pub const OUTBOX_CHANNEL: &str = "crm_analytics_outbox";

/// How long `attach` waits for a lock on a CRM table before it gives up. A trigger change
/// waits behind every open transaction that wrote to the table, and CRM writes queue behind
/// the waiting change: the wait must stay short.
const LOCK_TIMEOUT: &str = "5s";

/// Columns each captured table must have: the ones the metrics read.
const REQUIRED_COLUMNS: [(CrmTable, &[&str]); 4] = [
    (CrmTable::Accounts, &["id"]),
    (
        CrmTable::Leads,
        &[
            "id",
            "account_id",
            "source",
            "status",
            "converted_at",
            "created_at",
        ],
    ),
    (
        CrmTable::Projects,
        &["id", "account_id", "status", "amount", "closed_at"],
    ),
    (CrmTable::Activities, &["id", "account_id", "occurred_at"]),
];

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("the CRM schema {schema:?} is missing {missing}. Point DATABASE_URL at the CRM database (and --crm-schema at its schema), or create the reference CRM schema with `crm-analytics migrate --create-crm-schema`")]
    MissingCrm { schema: String, missing: String },
    #[error("the capture triggers of {table} could not be changed: another transaction held a lock on the table for more than {LOCK_TIMEOUT}. Nothing was changed; retry when the CRM is less busy")]
    Busy { table: String },
    #[error(transparent)]
    Migrate(#[from] migrate::MigrateError),
    #[error("capture setup failed: {0}")]
    Database(#[from] sqlx::Error),
}

/// Creates the reference CRM tables (for demos and tests; a real CRM brings its own).
pub async fn create_reference_schema(pool: &PgPool, crm_schema: &str) -> Result<(), CaptureError> {
    let sql = include_str!("sql/crm_reference_schema.sql").replace("{crm}", crm_schema);
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('crm_analytics.migrate'))")
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(&format!("CREATE SCHEMA IF NOT EXISTS {crm_schema};"))
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(&sql).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

/// Checks that the four CRM tables exist with the columns the metrics need.
pub async fn check_crm_tables(pool: &PgPool, crm_schema: &str) -> Result<(), CaptureError> {
    let present: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text FROM information_schema.columns
         WHERE table_schema = $1",
    )
    .bind(crm_schema)
    .fetch_all(pool)
    .await?;
    let mut missing = Vec::new();
    for (table, columns) in REQUIRED_COLUMNS {
        let has_table = present.iter().any(|(t, _)| t == table.name());
        if !has_table {
            missing.push(format!("table {}", table.name()));
            continue;
        }
        for column in columns {
            if !present
                .iter()
                .any(|(t, c)| t == table.name() && c == column)
            {
                missing.push(format!("column {}.{}", table.name(), column));
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CaptureError::MissingCrm {
            schema: crm_schema.to_string(),
            missing: missing.join(", "),
        })
    }
}

/// What a row image carries into the outbox, the queue, the archive and `failed_events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CaptureColumns {
    /// Every column of the row, as `to_jsonb` renders it.
    All,
    /// Only the id and the columns the metrics read (personal data stays in the CRM); an
    /// UPDATE is captured only when one of those columns changes.
    Metrics,
}

/// Installs or upgrades the outbox, then attaches the triggers that are not attached yet,
/// keeping the row images the installation already captures (every column on a first run).
/// Running it again changes nothing. Returns the number of triggers it created.
pub async fn attach(pool: &PgPool, crm_schema: &str) -> Result<usize, CaptureError> {
    attach_with(pool, crm_schema, None).await
}

/// [`attach`], choosing what row images carry: `None` keeps the current choice. Switching
/// replaces the capture triggers in one transaction, so no change goes uncaptured, waiting
/// at most `LOCK_TIMEOUT` (5 s) for each CRM table ([`CaptureError::Busy`] beyond that).
pub async fn attach_with(
    pool: &PgPool,
    crm_schema: &str,
    columns: Option<CaptureColumns>,
) -> Result<usize, CaptureError> {
    check_crm_tables(pool, crm_schema).await?;
    migrate::apply(pool, "capture", MIGRATIONS).await?;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('crm_analytics.migrate'))")
        .execute(&mut *tx)
        .await?;
    // Set after the advisory lock: a concurrent `migrate` may be waited for, the CRM not.
    sqlx::raw_sql(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        .execute(&mut *tx)
        .await?;
    let columns = match columns {
        Some(columns) => columns,
        None => current_columns(&mut tx, crm_schema).await?,
    };
    let mut created = 0;
    for (table, metric_columns) in REQUIRED_COLUMNS {
        let qualified = format!("{crm_schema}.{}", table.name());
        let (function, changed) = match columns {
            CaptureColumns::All => (
                "crm_analytics.capture_row_change()".to_string(),
                "OLD.* IS DISTINCT FROM NEW.*".to_string(),
            ),
            CaptureColumns::Metrics => {
                let function = install_metrics_function(&mut tx, table, metric_columns).await?;
                let (old, new) = (row_of("OLD", metric_columns), row_of("NEW", metric_columns));
                (function, format!("{old} IS DISTINCT FROM {new}"))
            }
        };
        let triggers = [
            (
                "crm_analytics_capture",
                Some(&function),
                format!(
                    "CREATE OR REPLACE TRIGGER crm_analytics_capture AFTER INSERT OR DELETE ON {qualified}
                     FOR EACH ROW EXECUTE FUNCTION {function}"
                ),
            ),
            // An UPDATE that changes no captured column changes no metric: not captured.
            (
                "crm_analytics_capture_update",
                Some(&function),
                format!(
                    "CREATE OR REPLACE TRIGGER crm_analytics_capture_update AFTER UPDATE ON {qualified}
                     FOR EACH ROW WHEN ({changed})
                     EXECUTE FUNCTION {function}"
                ),
            ),
            (
                "crm_analytics_notify",
                None,
                format!(
                    "CREATE OR REPLACE TRIGGER crm_analytics_notify AFTER INSERT OR UPDATE OR DELETE ON {qualified}
                     FOR EACH STATEMENT EXECUTE FUNCTION crm_analytics.notify_outbox()"
                ),
            ),
            (
                "crm_analytics_no_truncate",
                None,
                format!(
                    "CREATE OR REPLACE TRIGGER crm_analytics_no_truncate BEFORE TRUNCATE ON {qualified}
                     FOR EACH STATEMENT EXECUTE FUNCTION crm_analytics.refuse_truncate()"
                ),
            ),
        ];
        for (name, wanted_function, ddl) in triggers {
            // None: absent; Some(true): present and calling the function this setting wants.
            let present: Option<bool> = sqlx::query_scalar(
                "SELECT $3::text IS NULL OR tgfoid = $3::text::regprocedure FROM pg_trigger
                 WHERE tgname = $1 AND tgrelid = to_regclass($2)",
            )
            .bind(name)
            .bind(&qualified)
            .bind(wanted_function)
            .fetch_optional(&mut *tx)
            .await?;
            if present == Some(true) {
                continue;
            }
            // CREATE OR REPLACE swaps a trigger in place under SHARE ROW EXCLUSIVE: CRM
            // reads go on, and no write slips between an old and a new trigger (a DROP
            // would take ACCESS EXCLUSIVE and stop reads too while it waits).
            sqlx::raw_sql(&ddl)
                .execute(&mut *tx)
                .await
                .map_err(|e| busy_or(e, &qualified))?;
            created += 1;
        }
    }
    if columns == CaptureColumns::All {
        drop_unused_metrics_functions(&mut tx).await?;
    }
    tx.commit().await?;
    tracing::info!(?columns, "capture triggers attached");
    Ok(created)
}

/// A lock timeout on `table` as [`CaptureError::Busy`] (the transaction rolls back, so
/// nothing changed); any other error as it is.
fn busy_or(error: sqlx::Error, table: &str) -> CaptureError {
    const LOCK_NOT_AVAILABLE: &str = "55P03";
    match &error {
        sqlx::Error::Database(db) if db.code().as_deref() == Some(LOCK_NOT_AVAILABLE) => {
            tracing::warn!(
                table,
                lock_timeout = LOCK_TIMEOUT,
                "capture trigger change timed out on a lock"
            );
            CaptureError::Busy {
                table: table.to_string(),
            }
        }
        _ => CaptureError::Database(error),
    }
}

/// Drops the `metrics` capture functions no trigger calls any more (after a switch back to
/// `all`), so the database keeps no stale capture code.
async fn drop_unused_metrics_functions(tx: &mut sqlx::PgConnection) -> Result<(), CaptureError> {
    let unused: Vec<String> = sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text FROM pg_proc p
         WHERE p.pronamespace = to_regnamespace('crm_analytics')
           AND p.proname LIKE 'capture\\_%\\_metrics'
           AND NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgfoid = p.oid)",
    )
    .fetch_all(&mut *tx)
    .await?;
    for function in unused {
        // A regprocedure's text is already a qualified, quoted signature.
        sqlx::raw_sql(&format!("DROP FUNCTION {function}"))
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// What the attached triggers capture now: the per-table functions mean `metrics`.
async fn current_columns(
    tx: &mut sqlx::PgConnection,
    crm_schema: &str,
) -> Result<CaptureColumns, CaptureError> {
    let metrics: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
                        JOIN pg_class c ON c.oid = t.tgrelid
         WHERE t.tgname = 'crm_analytics_capture'
           AND c.relnamespace = to_regnamespace($1)
           AND p.pronamespace = to_regnamespace('crm_analytics')
           AND p.proname LIKE 'capture\\_%\\_metrics')",
    )
    .bind(crm_schema)
    .fetch_one(&mut *tx)
    .await?;
    Ok(if metrics {
        CaptureColumns::Metrics
    } else {
        CaptureColumns::All
    })
}

/// A quoted SQL identifier (the column names are ours, quoting keeps them exact).
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `(OLD."a", OLD."b")`: the captured columns of one side of a change.
fn row_of(side: &str, columns: &[&str]) -> String {
    let fields: Vec<String> = columns
        .iter()
        .map(|c| format!("{side}.{}", quote_ident(c)))
        .collect();
    format!("ROW({})", fields.join(", "))
}

/// `jsonb_build_object('a', NEW."a", ...)`: the image of the captured columns only, so the
/// others (and whatever code their types run to become JSON) are never even read.
fn image_of(side: &str, columns: &[&str]) -> String {
    let pairs: Vec<String> = columns
        .iter()
        .map(|c| format!("'{c}', {side}.{}", quote_ident(c)))
        .collect();
    format!("jsonb_build_object({})", pairs.join(", "))
}

/// Creates or replaces the `metrics` capture function of one table, owned by the capture
/// role like the others. Returns its signature.
async fn install_metrics_function(
    tx: &mut sqlx::PgConnection,
    table: CrmTable,
    columns: &[&str],
) -> Result<String, CaptureError> {
    let name = format!("crm_analytics.capture_{}_metrics", table.name());
    let (old, new) = (image_of("OLD", columns), image_of("NEW", columns));
    // Same body as capture_row_change (migration 1), with explicit images.
    let body = format!(
        "CREATE OR REPLACE FUNCTION {name}() RETURNS trigger
         LANGUAGE plpgsql SECURITY DEFINER
         SET search_path = pg_catalog, pg_temp
         SET timezone = 'UTC'
         AS $$
         BEGIN
             IF TG_OP = 'INSERT' THEN
                 INSERT INTO crm_analytics.event_outbox (event_type, aggregate_id, payload)
                 VALUES (TG_TABLE_NAME || '.insert', NEW.id, jsonb_build_object('new', {new}));
                 RETURN NEW;
             ELSIF TG_OP = 'UPDATE' THEN
                 INSERT INTO crm_analytics.event_outbox (event_type, aggregate_id, payload)
                 VALUES (TG_TABLE_NAME || '.update', NEW.id,
                         jsonb_build_object('old', {old}, 'new', {new}));
                 RETURN NEW;
             ELSE
                 INSERT INTO crm_analytics.event_outbox (event_type, aggregate_id, payload)
                 VALUES (TG_TABLE_NAME || '.delete', OLD.id, jsonb_build_object('old', {old}));
                 RETURN OLD;
             END IF;
         END;
         $$"
    );
    let exists: bool = sqlx::query_scalar("SELECT to_regprocedure($1) IS NOT NULL")
        .bind(format!("{name}()"))
        .fetch_one(&mut *tx)
        .await?;
    sqlx::raw_sql(&body).execute(&mut *tx).await?;
    if !exists {
        // As in migration 4: CREATE on the schema only for the moment of the hand-over.
        sqlx::raw_sql(&format!(
            "REVOKE ALL ON FUNCTION {name}() FROM PUBLIC;
             GRANT CREATE ON SCHEMA crm_analytics TO {CAPTURE_ROLE};
             ALTER FUNCTION {name}() OWNER TO {CAPTURE_ROLE};
             REVOKE CREATE ON SCHEMA crm_analytics FROM {CAPTURE_ROLE};"
        ))
        .execute(&mut *tx)
        .await?;
    }
    Ok(format!("{name}()"))
}
