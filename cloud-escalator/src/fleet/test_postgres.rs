//! A private PostgreSQL schema for one test, on the server this machine runs (docs/fleet.md).
//!
//! The server is `CASCADE_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`).
//! Without one the test is skipped with a message, except under CI (`CI` set), where the tests
//! must not pass without having run.

/// A schema created for one test and dropped after it.
#[derive(Debug)]
pub struct TestSchema {
    /// A connection URL whose search path is the schema.
    pub url: String,
    base: String,
    schema: String,
}

impl TestSchema {
    /// Creates the schema, or returns `None` (after saying why) when no server is reachable
    /// outside CI.
    pub fn create() -> Option<TestSchema> {
        // The synchronous client runs its own runtime, which must not start inside a test's.
        std::thread::scope(|s| s.spawn(Self::create_here).join().expect("no panic"))
    }

    fn create_here() -> Option<TestSchema> {
        let base = std::env::var("CASCADE_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let mut client = match postgres::Client::connect(&base, postgres::NoTls) {
            Ok(c) => c,
            Err(e) if std::env::var_os("CI").is_none() => {
                #[allow(clippy::print_stderr)]
                {
                    eprintln!("SKIPPED: no PostgreSQL at {base} ({e}); set CASCADE_TEST_POSTGRES");
                }
                return None;
            }
            Err(e) => panic!("PostgreSQL at {base} is needed under CI: {e}"),
        };
        let schema = format!(
            "cascade_test_{}",
            super::store::new_secret("s").split_off(2)
        );
        client
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .expect("create a test schema");
        let sep = if base.contains('?') { '&' } else { '?' };
        Some(TestSchema {
            url: format!("{base}{sep}options=-csearch_path%3D{schema}"),
            base,
            schema,
        })
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let (base, schema) = (&self.base, &self.schema);
        std::thread::scope(|s| {
            s.spawn(|| {
                if let Ok(mut client) = postgres::Client::connect(base, postgres::NoTls) {
                    let _ = client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"));
                }
            });
        });
    }
}
