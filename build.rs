//! Compiles the PostgreSQL half of the integration suite in when
//! `SEALPOST_TEST_DATABASE_URL` is set, so that without it those tests do not
//! exist (rather than pass without testing anything).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(sealpost_pg_tests)");
    println!("cargo::rerun-if-env-changed=SEALPOST_TEST_DATABASE_URL");
    if std::env::var_os("SEALPOST_TEST_DATABASE_URL").is_some_and(|v| !v.is_empty()) {
        println!("cargo::rustc-cfg=sealpost_pg_tests");
    }
}
