//! External backends the test script starts (PostgreSQL, Redis): each test gets its own
//! PostgreSQL database. Without them a test is skipped with a message — except under
//! `CI=true`, where a missing backend is a failure.
use std::time::Duration;

fn missing(what: &str, var: &str) -> Option<String> {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{what} is required in CI: {var} is not set (scripts/test starts one)");
    }
    eprintln!("SKIPPED the {what} part: {var} is not set (run the tests through scripts/test, which starts {what})");
    None
}

/// A fresh, empty PostgreSQL database for this test, as a URL.
pub async fn postgres() -> Option<String> {
    let base = match std::env::var("TEST_PG_URL") {
        Ok(u) if !u.is_empty() => u,
        _ => return missing("PostgreSQL", "TEST_PG_URL"),
    };
    sqlx::any::install_default_drivers();
    let name = format!("t_{:016x}", rand::random::<u64>());
    let pool = tokio::time::timeout(Duration::from_secs(10), sqlx::AnyPool::connect(&base))
        .await
        .expect("PostgreSQL answers")
        .expect("connect to TEST_PG_URL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&pool).await.expect("create a test database");
    pool.close().await;
    let (prefix, _) = base.rsplit_once('/').expect("TEST_PG_URL ends with /database");
    Some(format!("{prefix}/{name}"))
}

/// The Redis the test script started.
pub fn redis() -> Option<String> {
    match std::env::var("TEST_REDIS_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => missing("Redis", "TEST_REDIS_URL"),
    }
}
