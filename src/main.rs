//! The `crm-analytics` binary: a thin shell over the library's CLI.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    crm_analytics::cli::main().await
}
