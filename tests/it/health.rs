//! Liveness and readiness.

use crate::backend_tests;
use crate::common::{Backend, TestServer};

backend_tests!(health_and_readiness);

async fn health_and_readiness(backend: Backend) {
    let server = TestServer::start(backend).await;
    assert_eq!(
        server.get("/healthz", None).await.expect(200)["status"],
        "ok"
    );
    assert_eq!(
        server.get("/readyz", None).await.expect(200)["status"],
        "ready"
    );
}

/// With the database gone, readiness fails and liveness does not.
#[cfg(sealpost_pg_tests)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_while_postgres_refuses_connections() {
    let server = TestServer::start(Backend::Postgres).await;
    let admin = std::env::var("SEALPOST_TEST_DATABASE_URL").unwrap();
    let name = server
        .db
        .url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
        .await
        .unwrap();
    let run = |sql: String| sqlx::query(sqlx::AssertSqlSafe(sql));
    run(format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
        .execute(&mut conn)
        .await
        .unwrap();
    run(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
    ))
    .execute(&mut conn)
    .await
    .unwrap();

    server
        .get("/readyz", None)
        .await
        .expect_error(503, "unavailable");
    assert_eq!(
        server.get("/healthz", None).await.expect(200)["status"],
        "ok"
    );

    run(format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        .execute(&mut conn)
        .await
        .unwrap();
    server.get("/readyz", None).await.expect(200);
}
