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
    // Named after this test process: a test cannot drop its database when it ends (it ends
    // with the process), so each new one drops those of test processes that have ended.
    let name = format!("t_{}_{:08x}", std::process::id(), rand::random::<u32>());
    let pool = tokio::time::timeout(Duration::from_secs(10), sqlx::AnyPool::connect(&base))
        .await
        .expect("PostgreSQL answers")
        .expect("connect to TEST_PG_URL");
    drop_ended(&pool).await;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&pool).await.expect("create a test database");
    pool.close().await;
    let (prefix, _) = base.rsplit_once('/').expect("TEST_PG_URL ends with /database");
    Some(format!("{prefix}/{name}"))
}

/// Drop the test databases of processes that have ended (and of older runs, whose names
/// carry no process id). Another test may be dropping the same one: failures are ignored.
async fn drop_ended(pool: &sqlx::AnyPool) {
    let Ok(names) = sqlx::query_scalar::<_, String>("SELECT datname FROM pg_database WHERE datname LIKE 't\\_%'").fetch_all(pool).await
    else {
        return;
    };
    for n in names {
        let alive = match n.split('_').nth(1).map(str::parse::<u32>) {
            Some(Ok(pid)) => std::path::Path::new(&format!("/proc/{pid}")).exists(),
            _ => false,
        };
        // Only names this harness makes are put into SQL.
        if !alive && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {n} WITH (FORCE)"))).execute(pool).await;
        }
    }
}

/// The Redis the test script started.
pub fn redis() -> Option<String> {
    match std::env::var("TEST_REDIS_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => missing("Redis", "TEST_REDIS_URL"),
    }
}
