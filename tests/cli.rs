//! The command line as a new user meets it: what it says before `migrate`, about a bad URL,
//! in `--help`, in a log file, and what the demo shows.

mod common;

use common::TestDb;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn crm_analytics(args: &[&str], database_url: Option<&str>) -> Command {
    let mut command = Command::new(common::binary());
    command
        .args(args)
        .env_remove("ANALYTICS_DATABASE_URL")
        .env_remove("CRM_ANALYTICS_LOG_FORMAT")
        .stdin(Stdio::null());
    match database_url {
        Some(url) => command.env("DATABASE_URL", url),
        None => command.env_remove("DATABASE_URL"),
    };
    command
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs a command that must end by itself within `limit`, and returns its output.
fn run_bounded(mut command: Command, limit: Duration) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let output = child.wait_with_output().expect("output");
            panic!("still running after {limit:?}:\n{}", text(&output));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test]
async fn commands_before_migrate_say_to_run_migrate_and_exit() {
    let db = TestDb::create().await;
    for args in [
        &["run", "--listen", "127.0.0.1:0"][..],
        &["status"],
        &["verify"],
        &["serve", "--listen", "127.0.0.1:0"],
    ] {
        let output = run_bounded(crm_analytics(args, Some(&db.url)), Duration::from_secs(30));
        let said = text(&output);
        assert!(!output.status.success(), "{args:?}: {said}");
        assert_eq!(
            said.matches("run `crm-analytics migrate`").count(),
            1,
            "{args:?} must say once to run migrate: {said}"
        );
        assert!(
            said.contains("capture is not installed"),
            "{args:?}: {said}"
        );
        assert!(!said.contains("relation"), "{args:?}: {said}");
    }
    db.drop_db().await;
}

#[tokio::test]
async fn bad_urls_name_the_setting_they_came_from_and_the_fix() {
    // No scheme: refused, with the expected form, naming the flag it came from.
    let output = crm_analytics(
        &["status", "--database-url", "localhost:5432/postgres"],
        None,
    )
    .output()
    .expect("run");
    let said = text(&output);
    assert_eq!(
        output.status.code(),
        Some(1),
        "a usage error, not a report: {said}"
    );
    assert_eq!(said.matches("is not a PostgreSQL URL").count(), 1, "{said}");
    assert!(!said.contains("unreachable"), "{said}");
    assert!(said.contains("--database-url"), "{said}");
    assert!(
        said.contains("postgres://user:password@host:5432/database"),
        "{said}"
    );

    // A database that does not exist: how to create it, and the flag's name.
    let missing = format!("{}/crm_analytics_no_such_db", common::server_url());
    let output = crm_analytics(&["status", "--database-url", &missing], None)
        .output()
        .expect("run");
    let said = text(&output);
    assert!(!output.status.success());
    assert!(said.contains("does not exist"), "{said}");
    assert!(said.contains("createdb"), "{said}");
    assert!(said.contains("(--database-url)"), "{said}");
    assert!(!said.contains("Start PostgreSQL"), "{said}");

    // The same from the environment names the variable.
    let output = crm_analytics(&["status"], Some(&missing))
        .output()
        .expect("run");
    let said = text(&output);
    assert!(said.contains("(DATABASE_URL)"), "{said}");

    // A listen address without a port gets an example.
    let output = crm_analytics(&["serve", "--listen", "localhost"], Some(&missing))
        .output()
        .expect("run");
    let said = text(&output);
    assert!(!output.status.success());
    assert!(said.contains("e.g. 127.0.0.1:8080"), "{said}");
}

#[test]
fn help_does_not_show_unset_variables_as_empty() {
    for args in [&["run", "--help"][..], &["demo", "--help"], &["--help"]] {
        let output = crm_analytics(args, None).output().expect("run");
        let said = text(&output);
        assert!(output.status.success(), "{said}");
        assert!(said.contains("[env: CRM_ANALYTICS_CRM_SCHEMA]"), "{said}");
        assert!(!said.contains("=]"), "{args:?}: {said}");
        assert!(!said.contains("[default: \"\"]"), "{args:?}: {said}");
    }
}

#[tokio::test]
async fn logs_written_to_a_pipe_carry_no_colour_codes() {
    let db = TestDb::create().await;
    let output = crm_analytics(&["migrate", "--create-crm-schema"], Some(&db.url))
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("migrated"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "{stderr:?}");
    db.drop_db().await;
}

#[tokio::test]
async fn the_demo_masks_the_password_and_shows_rates() {
    let db = TestDb::create().await;
    let with_password =
        db.url
            .replacen("postgres://postgres@", "postgres://postgres:s3cret-pw@", 1);
    assert_ne!(
        with_password, db.url,
        "the test server URL has the expected form"
    );
    let archive = db.archive.to_string_lossy().into_owned();
    let output = run_bounded(
        crm_analytics(
            &[
                "demo",
                "--duration",
                "2s",
                "--listen",
                "127.0.0.1:0",
                "--archive",
                &archive,
            ],
            Some(&with_password),
        ),
        Duration::from_secs(120),
    );
    let said = text(&output);
    assert!(output.status.success(), "{said}");
    assert!(!said.contains("s3cret-pw"), "{said}");
    assert!(said.contains("postgres:***@"), "{said}");
    assert!(said.contains("transactions committed ("), "{said}");
    assert!(said.contains("/s)  events applied"), "{said}");
    db.drop_db().await;
}

#[test]
fn a_queue_capacity_of_zero_is_refused_naming_the_setting() {
    // With room for nothing, the relay would never relay: refused before anything starts.
    let mut command = crm_analytics(
        &["run"],
        Some("postgres://postgres@127.0.0.1:5432/postgres"),
    );
    command.env("CRM_ANALYTICS_QUEUE_CAPACITY", "0");
    let output = run_bounded(command, Duration::from_secs(20));
    let said = text(&output);
    assert_eq!(output.status.code(), Some(2), "{said}");
    assert!(said.contains("queue-capacity"), "{said}");
}

#[test]
fn an_endpoint_with_a_password_is_refused_without_showing_it() {
    // Credentials belong in the AWS variables; an error must not print them either.
    for (setting, flag, value) in [
        (
            "CRM_ANALYTICS_SQS_ENDPOINT",
            "sqs-endpoint",
            "http://key:s3cr3t@127.0.0.1:4566",
        ),
        (
            "CRM_ANALYTICS_SQS_ENDPOINT",
            "sqs-endpoint",
            "ftp://key:s3cr3t@127.0.0.1:4566",
        ),
        (
            "CRM_ANALYTICS_S3_ENDPOINT",
            "s3-endpoint",
            "http://key:s3cr3t@127.0.0.1:9000",
        ),
        (
            "CRM_ANALYTICS_QUEUE",
            "queue",
            "sqs://https://key:s3cr3t@sqs.example.com/1/q",
        ),
    ] {
        let mut command = crm_analytics(
            &["run"],
            Some("postgres://postgres@127.0.0.1:5432/postgres"),
        );
        command.env(setting, value);
        let output = run_bounded(command, Duration::from_secs(20));
        let said = text(&output);
        assert_eq!(output.status.code(), Some(2), "{setting}: {said}");
        assert!(said.contains(flag), "{setting}: {said}");
        assert!(
            !said.contains("s3cr3t"),
            "{setting} showed the password: {said}"
        );
    }
}

#[test]
fn a_dedup_retention_too_short_for_redeliveries_is_refused_naming_the_setting() {
    let mut command = crm_analytics(
        &["run"],
        Some("postgres://postgres@127.0.0.1:5432/postgres"),
    );
    command.env("CRM_ANALYTICS_DEDUP_RETENTION", "0s");
    let output = run_bounded(command, Duration::from_secs(20));
    let said = text(&output);
    assert_eq!(output.status.code(), Some(2), "{said}");
    assert!(
        said.contains("dedup-retention") && said.contains("counted twice"),
        "{said}"
    );
}

/// The outbox as the queue reads the CRM's outbox in the analytics database: with the
/// analytics elsewhere it is refused, naming the settings, before anything runs (and
/// even where that other database holds an outbox of its own). Unset, the queue is then
/// the embedded one, behind a relay.
#[tokio::test]
async fn the_outbox_as_the_queue_is_refused_with_a_separate_analytics_database() {
    let (crm, crm_pool) = TestDb::migrated().await;
    let (analytics, analytics_pool) = TestDb::migrated().await;
    let run = |command: &str, queue: Option<&str>| {
        let mut command = crm_analytics(&[command], Some(&crm.url));
        command.env("ANALYTICS_DATABASE_URL", &analytics.url);
        match queue {
            Some(queue) => command.env("CRM_ANALYTICS_QUEUE", queue),
            None => command.env_remove("CRM_ANALYTICS_QUEUE"),
        };
        command.output().expect("run crm-analytics")
    };
    for command in ["worker", "status"] {
        let output = run(command, Some("outbox"));
        let said = text(&output);
        assert!(!output.status.success(), "{command}: {said}");
        assert!(
            said.contains("CRM_ANALYTICS_QUEUE=outbox needs the analytics in the CRM's database")
                && said.contains("ANALYTICS_DATABASE_URL"),
            "{command}: {said}"
        );
    }
    let output = run("status", None);
    let said = text(&output);
    assert!(output.status.success(), "{said}");
    assert!(said.contains("queue          postgres, up"), "{said}");
    analytics.finish(analytics_pool).await;
    crm.finish(crm_pool).await;
}
