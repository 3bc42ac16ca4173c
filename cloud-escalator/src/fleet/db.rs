//! The fleet database: SQLite (embedded, the default) or PostgreSQL (for fleets that outgrow one
//! node), behind one small interface.
//!
//! Every query is written once, in the SQL both engines accept: `$1, $2, …` placeholders (SQLite
//! numbers `$N` parameters by first appearance, so each query uses them in order), `BIGINT`,
//! `DOUBLE PRECISION`, `TEXT`, and `INSERT … ON CONFLICT … DO UPDATE`. Values cross the boundary
//! as [`Value`]. This thin layer is hand-written because the libraries that abstract over both
//! engines (sqlx's `Any`) would bring a second, conflicting SQLite build next to rusqlite's and an
//! async runtime of their own; a fleet database does a few dozen kinds of statement.
//!
//! The schema is versioned: [`MIGRATIONS`] are applied in order, each once, recorded in
//! `schema_migrations`, inside a transaction.

use std::path::{Path, PathBuf};

/// What went wrong with the fleet database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// SQLite failed.
    #[error("fleet store (SQLite {path}): {error}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// The error.
        error: rusqlite::Error,
    },
    /// PostgreSQL failed (connection refused, lost, or a statement error). Retrying may help when
    /// the server was unreachable.
    #[error("fleet store (PostgreSQL): {0}")]
    Postgres(#[from] postgres::Error),
    /// The SQLite file's directory cannot be created.
    #[error("fleet store: cannot create {path}: {error}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// The store URL is not understood.
    #[error(
        "fleet store {0:?}: expected a file path, sqlite:PATH, or postgres://USER@HOST:PORT/DB"
    )]
    Url(String),
    /// A stored value has an unexpected type (a schema from another version?).
    #[error("fleet store: column {column} holds {found}, expected {expected}")]
    Type {
        /// Column index in the result.
        column: usize,
        /// What was there.
        found: &'static str,
        /// What the code expected.
        expected: &'static str,
    },
}

/// A value passed to or read from a statement.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A 64-bit integer.
    Int(i64),
    /// A double.
    Float(f64),
    /// Text.
    Text(String),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// One result row.
#[derive(Debug, Clone)]
pub struct Row(pub Vec<Value>);

impl Row {
    fn type_error(&self, column: usize, expected: &'static str) -> DbError {
        let found = match self.0.get(column) {
            None => "nothing",
            Some(Value::Null) => "NULL",
            Some(Value::Int(_)) => "an integer",
            Some(Value::Float(_)) => "a double",
            Some(Value::Text(_)) => "text",
        };
        DbError::Type {
            column,
            found,
            expected,
        }
    }

    /// An integer column.
    pub fn int(&self, column: usize) -> Result<i64, DbError> {
        match self.0.get(column) {
            Some(Value::Int(v)) => Ok(*v),
            _ => Err(self.type_error(column, "an integer")),
        }
    }

    /// A nullable integer column.
    pub fn opt_int(&self, column: usize) -> Result<Option<i64>, DbError> {
        match self.0.get(column) {
            Some(Value::Null) => Ok(None),
            _ => self.int(column).map(Some),
        }
    }

    /// A double column (integers are widened).
    pub fn float(&self, column: usize) -> Result<f64, DbError> {
        match self.0.get(column) {
            Some(Value::Float(v)) => Ok(*v),
            Some(Value::Int(v)) => Ok(*v as f64),
            _ => Err(self.type_error(column, "a double")),
        }
    }

    /// A text column.
    pub fn text(&self, column: usize) -> Result<String, DbError> {
        match self.0.get(column) {
            Some(Value::Text(v)) => Ok(v.clone()),
            _ => Err(self.type_error(column, "text")),
        }
    }

    /// A nullable text column.
    pub fn opt_text(&self, column: usize) -> Result<Option<String>, DbError> {
        match self.0.get(column) {
            Some(Value::Null) => Ok(None),
            _ => self.text(column).map(Some),
        }
    }
}

/// Schema versions, applied in order. Append only: a released migration is never edited.
pub const MIGRATIONS: &[(i64, &str)] = &[(
    1,
    "CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        grp TEXT,
        labels TEXT NOT NULL DEFAULT '{}',
        presence TEXT NOT NULL,
        first_seen_ms BIGINT NOT NULL,
        last_seen_ms BIGINT NOT NULL,
        agent_version TEXT,
        model TEXT,
        model_version TEXT,
        policy_sequence BIGINT NOT NULL DEFAULT 0,
        inputs BIGINT NOT NULL DEFAULT 0,
        escalations BIGINT NOT NULL DEFAULT 0,
        verdicts BIGINT NOT NULL DEFAULT 0,
        errors BIGINT NOT NULL DEFAULT 0,
        uptime_s BIGINT NOT NULL DEFAULT 0,
        escalation_rate DOUBLE PRECISION,
        inference_p50_us BIGINT,
        inference_p99_us BIGINT,
        queue_depth BIGINT,
        verdicts_seen BIGINT NOT NULL DEFAULT 0,
        agreements_seen BIGINT NOT NULL DEFAULT 0,
        ota_model TEXT,
        ota_state TEXT,
        ota_detail TEXT,
        ota_at_ms BIGINT
    );
    CREATE INDEX devices_grp ON devices (grp);
    CREATE TABLE series (
        minute BIGINT NOT NULL,
        replica TEXT NOT NULL,
        inputs BIGINT NOT NULL,
        escalations BIGINT NOT NULL,
        verdicts BIGINT NOT NULL,
        agreements BIGINT NOT NULL,
        answered BIGINT NOT NULL,
        latency_p50_us BIGINT,
        latency_p99_us BIGINT,
        latency_max_us BIGINT,
        PRIMARY KEY (minute, replica)
    );
    CREATE TABLE api_tokens (
        hash TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        role TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        revoked_ms BIGINT
    );
    CREATE TABLE enrollment_tokens (
        hash TEXT PRIMARY KEY,
        grp TEXT,
        created_by TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        expires_ms BIGINT NOT NULL,
        uses_left BIGINT NOT NULL
    );
    CREATE TABLE audit (
        at_ms BIGINT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX audit_at ON audit (at_ms);",
)];

/// A connection to the fleet database.
pub enum Db {
    /// The embedded store.
    Sqlite {
        /// The connection.
        conn: rusqlite::Connection,
        /// Its file, for error messages.
        path: PathBuf,
    },
    /// A PostgreSQL server.
    Postgres(Pg),
}

/// A PostgreSQL connection that reconnects once it finds itself closed (server restart, network
/// loss), so the store recovers without restarting the escalator.
pub struct Pg {
    client: Option<Box<postgres::Client>>,
    url: String,
    in_transaction: bool,
}

impl Pg {
    fn client(&mut self) -> Result<&mut postgres::Client, DbError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = None;
            tracing::info!("fleet store: connecting to PostgreSQL");
            self.client = Some(Box::new(postgres::Client::connect(
                &self.url,
                postgres::NoTls,
            )?));
        }
        Ok(self.client.as_mut().expect("just connected"))
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        // The synchronous client closes its connection through a runtime of its own, which
        // panics inside another runtime: the escalator drops its store on an async thread.
        if let Some(client) = self.client.take()
            && tokio::runtime::Handle::try_current().is_ok()
        {
            let _ = std::thread::Builder::new()
                .name("fleet-store-close".into())
                .spawn(move || drop(client));
        }
    }
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Db::Sqlite { path, .. } => write!(f, "Db::Sqlite({})", path.display()),
            Db::Postgres(_) => f.write_str("Db::Postgres"),
        }
    }
}

impl Db {
    /// Opens the store at `url`: `postgres://…` (or `postgresql://…`; `?options=-csearch_path%3D…`
    /// selects a schema), else `sqlite:PATH` or a plain path. Applies pending migrations.
    pub fn open(url: &str) -> Result<Db, DbError> {
        let mut db = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let mut pg = Pg {
                client: None,
                url: url.to_owned(),
                in_transaction: false,
            };
            pg.client()?;
            Db::Postgres(pg)
        } else {
            let path = Path::new(url.strip_prefix("sqlite:").unwrap_or(url)).to_owned();
            if path.as_os_str().is_empty() {
                return Err(DbError::Url(url.into()));
            }
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|error| DbError::Dir {
                    path: dir.to_owned(),
                    error,
                })?;
            }
            let conn = rusqlite::Connection::open(&path).map_err(|error| DbError::Sqlite {
                path: path.clone(),
                error,
            })?;
            // WAL: other processes (the CLI's bootstrap-token, backups) can read and write beside
            // the escalator; NORMAL sync is durable across process crashes, which is what fleet
            // state needs (devices re-report after a power loss). LIKE is case-sensitive, as in
            // PostgreSQL, so filters mean the same on both.
            conn.execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000; PRAGMA case_sensitive_like = ON;",
            )
            .map_err(|error| DbError::Sqlite {
                path: path.clone(),
                error,
            })?;
            Db::Sqlite { conn, path }
        };
        db.migrate()?;
        Ok(db)
    }

    /// Which engine, for logs.
    pub fn engine(&self) -> &'static str {
        match self {
            Db::Sqlite { .. } => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    fn migrate(&mut self) -> Result<(), DbError> {
        for (version, sql) in MIGRATIONS {
            self.transaction(|tx| {
                // Replicas starting together: one migrates, the others wait here and then find
                // the version applied. (SQLite serializes writers by itself.)
                if let Db::Postgres(_) = tx {
                    tx.batch("SELECT pg_advisory_xact_lock(7300455311)")?;
                }
                tx.batch(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)",
                )?;
                let done = tx.query(
                    "SELECT version FROM schema_migrations WHERE version = $1",
                    &[Value::Int(*version)],
                )?;
                if done.is_empty() {
                    tracing::info!(version, "fleet store: applying migration");
                    tx.batch(sql)?;
                    tx.execute(
                        "INSERT INTO schema_migrations (version, applied_ms) VALUES ($1, $2)",
                        &[Value::Int(*version), Value::from(super::now_ms())],
                    )?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    fn sqlite_error(path: &Path) -> impl FnOnce(rusqlite::Error) -> DbError + '_ {
        move |error| DbError::Sqlite {
            path: path.to_owned(),
            error,
        }
    }

    /// Runs statements without parameters (schema changes).
    pub fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        match self {
            Db::Sqlite { conn, path } => conn.execute_batch(sql).map_err(Self::sqlite_error(path)),
            Db::Postgres(pg) => Ok(pg.client()?.batch_execute(sql)?),
        }
    }

    /// Runs one statement; returns the rows it changed.
    pub fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        match self {
            Db::Sqlite { conn, path } => {
                let mut stmt = conn.prepare_cached(sql).map_err(Self::sqlite_error(path))?;
                let n = stmt
                    .execute(rusqlite::params_from_iter(params.iter().map(SqliteValue)))
                    .map_err(Self::sqlite_error(path))?;
                Ok(n as u64)
            }
            Db::Postgres(pg) => {
                let params = pg_params(params);
                Ok(pg.client()?.execute(sql, &pg_refs(&params))?)
            }
        }
    }

    /// Runs a query; returns every row.
    pub fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        match self {
            Db::Sqlite { conn, path } => {
                let mut stmt = conn.prepare_cached(sql).map_err(Self::sqlite_error(path))?;
                let columns = stmt.column_count();
                let rows = stmt
                    .query_map(
                        rusqlite::params_from_iter(params.iter().map(SqliteValue)),
                        |row| {
                            (0..columns)
                                .map(|i| {
                                    Ok(match row.get_ref(i)? {
                                        rusqlite::types::ValueRef::Null => Value::Null,
                                        rusqlite::types::ValueRef::Integer(v) => Value::Int(v),
                                        rusqlite::types::ValueRef::Real(v) => Value::Float(v),
                                        rusqlite::types::ValueRef::Text(t)
                                        | rusqlite::types::ValueRef::Blob(t) => {
                                            Value::Text(String::from_utf8_lossy(t).into_owned())
                                        }
                                    })
                                })
                                .collect::<Result<Vec<_>, _>>()
                                .map(Row)
                        },
                    )
                    .map_err(Self::sqlite_error(path))?;
                rows.collect::<Result<Vec<_>, _>>()
                    .map_err(Self::sqlite_error(path))
            }
            Db::Postgres(pg) => {
                let params = pg_params(params);
                let rows = pg.client()?.query(sql, &pg_refs(&params))?;
                rows.iter()
                    .map(|row| {
                        (0..row.len())
                            .map(|i| pg_value(row, i))
                            .collect::<Result<Vec<_>, _>>()
                            .map(Row)
                    })
                    .collect()
            }
        }
    }

    fn in_transaction(&self) -> bool {
        match self {
            Db::Sqlite { conn, .. } => !conn.is_autocommit(),
            Db::Postgres(pg) => pg.in_transaction,
        }
    }

    fn set_transaction(&mut self, open: bool) {
        if let Db::Postgres(pg) = self {
            pg.in_transaction = open;
        }
    }

    /// Runs `f` in a transaction: committed when it returns `Ok`, rolled back otherwise. Inside
    /// another transaction, `f` joins it (a change and its audit record are one unit).
    pub fn transaction<T>(
        &mut self,
        f: impl FnOnce(&mut Db) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        if self.in_transaction() {
            return f(self);
        }
        self.batch("BEGIN")?;
        self.set_transaction(true);
        let result = f(self);
        self.set_transaction(false);
        match result {
            Ok(v) => {
                self.batch("COMMIT")?;
                Ok(v)
            }
            Err(e) => {
                // The original error is the one worth reporting.
                let _ = self.batch("ROLLBACK");
                Err(e)
            }
        }
    }
}

struct SqliteValue<'a>(&'a Value);

impl rusqlite::ToSql for SqliteValue<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self.0 {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Int(v) => ToSqlOutput::Borrowed(ValueRef::Integer(*v)),
            Value::Float(v) => ToSqlOutput::Borrowed(ValueRef::Real(*v)),
            Value::Text(v) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
        })
    }
}

/// A PostgreSQL parameter. NULL needs a type of its own: `Option<i64>`'s NULL is refused for a
/// text column, so [`PgNull`] accepts every column type.
enum PgParam {
    Null(PgNull),
    Int(i64),
    Float(f64),
    Text(String),
}

#[derive(Debug)]
struct PgNull;

impl postgres::types::ToSql for PgNull {
    fn to_sql(
        &self,
        _: &postgres::types::Type,
        _: &mut bytes::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        Ok(postgres::types::IsNull::Yes)
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

fn pg_params(params: &[Value]) -> Vec<PgParam> {
    params
        .iter()
        .map(|v| match v {
            Value::Null => PgParam::Null(PgNull),
            Value::Int(v) => PgParam::Int(*v),
            Value::Float(v) => PgParam::Float(*v),
            Value::Text(v) => PgParam::Text(v.clone()),
        })
        .collect()
}

fn pg_refs(params: &[PgParam]) -> Vec<&(dyn postgres::types::ToSql + Sync)> {
    params
        .iter()
        .map(|p| match p {
            PgParam::Null(v) => v as &(dyn postgres::types::ToSql + Sync),
            PgParam::Int(v) => v,
            PgParam::Float(v) => v,
            PgParam::Text(v) => v,
        })
        .collect()
}

fn pg_value(row: &postgres::Row, i: usize) -> Result<Value, DbError> {
    use postgres::types::Type;
    let ty = row.columns()[i].type_().clone();
    Ok(if ty == Type::INT8 {
        row.try_get::<_, Option<i64>>(i)?
            .map_or(Value::Null, Value::Int)
    } else if ty == Type::INT4 {
        row.try_get::<_, Option<i32>>(i)?
            .map_or(Value::Null, |v| Value::Int(v.into()))
    } else if ty == Type::FLOAT8 {
        row.try_get::<_, Option<f64>>(i)?
            .map_or(Value::Null, Value::Float)
    } else if ty == Type::NUMERIC {
        // SUM(BIGINT) is NUMERIC in PostgreSQL; queries cast sums to BIGINT, so this is a bug.
        return Err(DbError::Type {
            column: i,
            found: "NUMERIC",
            expected: "BIGINT (cast the aggregate)",
        });
    } else {
        row.try_get::<_, Option<String>>(i)?
            .map_or(Value::Null, Value::Text)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_round_trips_values_and_migrates_once() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("fleet.db").display());
        let mut db = Db::open(&url).unwrap();
        db.execute(
            "INSERT INTO audit (at_ms, actor, action, target, detail) VALUES ($1, $2, $3, $4, $5)",
            &[
                Value::Int(5),
                "ana".into(),
                "device.update".into(),
                "cam-1".into(),
                "{}".into(),
            ],
        )
        .unwrap();
        drop(db);
        // Opening again applies nothing twice and keeps the data.
        let mut db = Db::open(&url).unwrap();
        let rows = db
            .query(
                "SELECT at_ms, actor FROM audit WHERE actor = $1",
                &["ana".into()],
            )
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].int(0).unwrap(), 5);
        assert_eq!(rows[0].text(1).unwrap(), "ana");
        let versions = db
            .query("SELECT version FROM schema_migrations", &[])
            .unwrap();
        assert_eq!(versions.len(), MIGRATIONS.len());
    }

    #[test]
    fn a_failed_transaction_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(dir.path().join("f.db").to_str().unwrap()).unwrap();
        let result: Result<(), DbError> = db.transaction(|tx| {
            tx.execute(
                "INSERT INTO audit (at_ms, actor, action, target, detail) VALUES (1, 'a', 'b', 'c', 'd')",
                &[],
            )?;
            tx.execute("INSERT INTO no_such_table VALUES (1)", &[])?;
            Ok(())
        });
        assert!(result.is_err());
        assert!(db.query("SELECT * FROM audit", &[]).unwrap().is_empty());
    }

    #[test]
    fn a_nested_transaction_joins_the_outer_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(dir.path().join("f.db").to_str().unwrap()).unwrap();
        let insert = "INSERT INTO audit (at_ms, actor, action, target, detail) VALUES (1, 'a', 'b', 'c', 'd')";
        let result: Result<(), DbError> = db.transaction(|tx| {
            tx.transaction(|inner| inner.execute(insert, &[]).map(drop))?;
            tx.execute("INSERT INTO no_such_table VALUES (1)", &[])?;
            Ok(())
        });
        assert!(result.is_err());
        assert!(
            db.query("SELECT * FROM audit", &[]).unwrap().is_empty(),
            "all rolled back"
        );
        db.transaction(|tx| tx.transaction(|inner| inner.execute(insert, &[])))
            .unwrap();
        assert_eq!(db.query("SELECT * FROM audit", &[]).unwrap().len(), 1);
    }

    #[test]
    fn type_errors_name_the_column() {
        let row = Row(vec![Value::Text("x".into())]);
        let e = row.int(0).unwrap_err().to_string();
        assert!(
            e.contains("column 0 holds text, expected an integer"),
            "{e}"
        );
    }

    #[test]
    fn bad_urls_are_explained() {
        assert!(matches!(Db::open("sqlite:"), Err(DbError::Url(_))));
    }
}
