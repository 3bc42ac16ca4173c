//! The hard-example store: every answered escalation, its edge result and the cloud verdict, kept in
//! SQLite (embedded, one file) and exportable as `.npy` for retraining.

use std::path::Path;

use cascade_infer::Tensor;
use ndarray::{ArrayD, Axis};
use rusqlite::{Connection, params};

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused.
    #[error("hard-example store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Export I/O.
    #[error("export: {0}")]
    Export(String),
}

/// One answered escalation.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Escalation id.
    pub id: String,
    /// Device (or its pseudonym).
    pub device: String,
    /// Edge model name.
    pub model: String,
    /// Edge model version.
    pub model_version: String,
    /// Privacy mode.
    pub privacy: String,
    /// The input as the cloud model saw it, `.npy` bytes.
    pub input_npy: Vec<u8>,
    /// Edge answer.
    pub edge_class: u32,
    /// Edge confidence.
    pub edge_confidence: f32,
    /// Policy rule that escalated it.
    pub rule: String,
    /// Cloud answer.
    pub cloud_class: u32,
    /// Its probability.
    pub cloud_probability: f32,
    /// Cloud model and version.
    pub cloud_model: String,
    /// When it was received, milliseconds since the Unix epoch.
    pub received_ms: u64,
}

/// Agreement between edge and cloud for one device and model.
#[derive(Debug, Clone, PartialEq)]
pub struct Agreement {
    /// Device.
    pub device: String,
    /// Edge model.
    pub model: String,
    /// Escalations answered.
    pub escalations: u64,
    /// Of which the cloud agreed with the edge.
    pub agreements: u64,
}

/// One stored escalation, without its input (for listings).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Recent {
    /// Escalation id.
    pub id: String,
    /// Edge model name.
    pub model: String,
    /// Edge model version.
    pub model_version: String,
    /// Privacy mode.
    pub privacy: String,
    /// Edge answer.
    pub edge_class: u32,
    /// Edge confidence.
    pub edge_confidence: f32,
    /// Policy rule that escalated it.
    pub rule: String,
    /// Cloud answer.
    pub cloud_class: u32,
    /// Its probability.
    pub cloud_probability: f32,
    /// Cloud model and version.
    pub cloud_model: String,
    /// When it was received, ms since the epoch.
    pub received_ms: u64,
}

/// The store. One owner (a blocking task); not shared across threads.
#[derive(Debug)]
pub struct Store {
    db: Connection,
}

impl Store {
    /// Opens (or creates) the store at `path` (`:memory:` for an in-memory one).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = if path == Path::new(":memory:") {
            Connection::open_in_memory()?
        } else {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            Connection::open(path)?
        };
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS examples (
                 id TEXT PRIMARY KEY,
                 device TEXT NOT NULL,
                 model TEXT NOT NULL,
                 model_version TEXT NOT NULL,
                 privacy TEXT NOT NULL,
                 input BLOB NOT NULL,
                 edge_class INTEGER NOT NULL,
                 edge_confidence REAL NOT NULL,
                 rule TEXT NOT NULL,
                 cloud_class INTEGER NOT NULL,
                 cloud_probability REAL NOT NULL,
                 cloud_model TEXT NOT NULL,
                 received_ms INTEGER NOT NULL
             );
             CREATE INDEX IF NOT EXISTS examples_device_model ON examples (device, model);",
        )?;
        Ok(Store { db })
    }

    /// Keeps an example (a duplicate id is ignored: escalations can be delivered twice).
    pub fn insert(&self, e: &Example) -> Result<bool, StoreError> {
        Ok(self.insert_all(std::slice::from_ref(e))? == 1)
    }

    /// Keeps `examples` in one transaction, duplicates ignored; returns how many were new. One
    /// commit per example was what the store could not keep up with at 16 000 escalations a
    /// second (`bench/batching.sh`, 2026-11-24: examples dropped), where a commit per group costs
    /// one write of the log. On an error nothing of the group is kept.
    pub fn insert_all(&self, examples: &[Example]) -> Result<usize, StoreError> {
        let tx = self.db.unchecked_transaction()?;
        let mut new = 0;
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO examples VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )?;
            for e in examples {
                new += insert.execute(params![
                    e.id,
                    e.device,
                    e.model,
                    e.model_version,
                    e.privacy,
                    e.input_npy,
                    e.edge_class,
                    f64::from(e.edge_confidence),
                    e.rule,
                    e.cloud_class,
                    f64::from(e.cloud_probability),
                    e.cloud_model,
                    e.received_ms as i64,
                ])?;
            }
        }
        tx.commit()?;
        Ok(new)
    }

    /// Examples stored.
    pub fn count(&self) -> Result<u64, StoreError> {
        Ok(self
            .db
            .query_row("SELECT COUNT(*) FROM examples", [], |r| r.get::<_, i64>(0))?
            as u64)
    }

    /// Edge/cloud agreement per device and model.
    pub fn agreement(&self) -> Result<Vec<Agreement>, StoreError> {
        let mut stmt = self.db.prepare(
            "SELECT device, model, COUNT(*), SUM(edge_class = cloud_class) FROM examples GROUP BY device, model ORDER BY device, model",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(Agreement {
                device: r.get(0)?,
                model: r.get(1)?,
                escalations: r.get::<_, i64>(2)? as u64,
                agreements: r.get::<_, i64>(3)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The newest `limit` escalations of `device`, newest first, without their inputs.
    pub fn recent(&self, device: &str, limit: u32) -> Result<Vec<Recent>, StoreError> {
        let mut stmt = self.db.prepare(
            "SELECT id, model, model_version, privacy, edge_class, edge_confidence, rule, cloud_class, cloud_probability, cloud_model, received_ms
             FROM examples WHERE device = ?1 ORDER BY received_ms DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(rusqlite::params![device, limit], |r| {
            Ok(Recent {
                id: r.get(0)?,
                model: r.get(1)?,
                model_version: r.get(2)?,
                privacy: r.get(3)?,
                edge_class: r.get(4)?,
                edge_confidence: r.get::<_, f64>(5)? as f32,
                rule: r.get(6)?,
                cloud_class: r.get(7)?,
                cloud_probability: r.get::<_, f64>(8)? as f32,
                cloud_model: r.get(9)?,
                received_ms: r.get::<_, i64>(10)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Writes the examples of `model` as `inputs.npy` (stacked, float32) and `labels.npy` (the
    /// cloud's classes, int64) into `dir`, the layout `edge-agent eval --data` reads. With
    /// `disagreements_only`, only examples where edge and cloud disagree. Returns how many.
    pub fn export(
        &self,
        model: &str,
        dir: &Path,
        disagreements_only: bool,
    ) -> Result<usize, StoreError> {
        let sql = if disagreements_only {
            "SELECT input, cloud_class FROM examples WHERE model = ?1 AND edge_class != cloud_class ORDER BY received_ms"
        } else {
            "SELECT input, cloud_class FROM examples WHERE model = ?1 ORDER BY received_ms"
        };
        let mut stmt = self.db.prepare(sql)?;
        let rows: Vec<(Vec<u8>, i64)> = stmt
            .query_map([model], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        if rows.is_empty() {
            return Ok(0);
        }
        let err = |e: String| StoreError::Export(e);
        let mut inputs = Vec::with_capacity(rows.len());
        for (npy, _) in &rows {
            let t = Tensor::from_npy_bytes(npy).map_err(err)?;
            // Drop the batch axis of one.
            let a = t.to_f32();
            let a = if a.ndim() > 1 && a.shape()[0] == 1 {
                a.index_axis(Axis(0), 0).to_owned()
            } else {
                a
            };
            inputs.push(a);
        }
        let views: Vec<_> = inputs.iter().map(|a| a.view()).collect();
        let stacked = ndarray::stack(Axis(0), &views)
            .map_err(|e| err(format!("inputs of different shapes: {e}")))?;
        let labels =
            ArrayD::from_shape_vec(vec![rows.len()], rows.iter().map(|(_, l)| *l).collect())
                .map_err(|e| err(e.to_string()))?;
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        Tensor::F32(stacked)
            .write_npy(&dir.join("inputs.npy"))
            .map_err(|e| err(e.to_string()))?;
        Tensor::I64(labels)
            .write_npy(&dir.join("labels.npy"))
            .map_err(|e| err(e.to_string()))?;
        Ok(rows.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(id: &str, device: &str, edge: u32, cloud: u32) -> Example {
        let input = Tensor::F32(ArrayD::from_elem(vec![1, 4], id.len() as f32));
        Example {
            id: id.into(),
            device: device.into(),
            model: "digits-edge".into(),
            model_version: "1.0.0".into(),
            privacy: "raw".into(),
            input_npy: input.to_npy_bytes(),
            edge_class: edge,
            edge_confidence: 0.4,
            rule: "low_confidence".into(),
            cloud_class: cloud,
            cloud_probability: 0.9,
            cloud_model: "digits-cloud@1.0.0".into(),
            received_ms: 1,
        }
    }

    #[test]
    fn keeps_examples_once_and_reports_agreement() {
        let s = Store::open(Path::new(":memory:")).unwrap();
        assert!(s.insert(&example("a", "d1", 3, 3)).unwrap());
        assert!(
            !s.insert(&example("a", "d1", 3, 3)).unwrap(),
            "duplicate id ignored"
        );
        s.insert(&example("b", "d1", 3, 8)).unwrap();
        s.insert(&example("c", "d2", 1, 1)).unwrap();
        assert_eq!(s.count().unwrap(), 3);
        let a = s.agreement().unwrap();
        assert_eq!(
            a[0],
            Agreement {
                device: "d1".into(),
                model: "digits-edge".into(),
                escalations: 2,
                agreements: 1
            }
        );
        assert_eq!(a[1].agreements, 1);
        let recent = s.recent("d1", 10).unwrap();
        assert_eq!(recent.len(), 2);
        assert_eq!((recent[0].edge_class, recent[0].cloud_class), (3, 3));
        assert_eq!(s.recent("d1", 1).unwrap().len(), 1);
        assert!(s.recent("nobody", 10).unwrap().is_empty());
    }

    #[test]
    fn keeps_a_group_in_one_transaction_and_counts_what_was_new() {
        let s = Store::open(Path::new(":memory:")).unwrap();
        s.insert(&example("a", "d1", 3, 3)).unwrap();
        let group = [
            example("a", "d1", 3, 3),
            example("b", "d1", 3, 8),
            example("b", "d1", 3, 8),
            example("c", "d2", 1, 1),
        ];
        assert_eq!(
            s.insert_all(&group).unwrap(),
            2,
            "a and the second b are duplicates"
        );
        assert_eq!(s.count().unwrap(), 3);
        assert_eq!(s.insert_all(&[]).unwrap(), 0);
        // A group whose last insert fails leaves nothing behind, its first example included.
        s.db.execute_batch(
            "CREATE TEMP TRIGGER refuse BEFORE INSERT ON examples WHEN NEW.id = 'bad'
             BEGIN SELECT RAISE(ABORT, 'refused'); END;",
        )
        .unwrap();
        let failing = [example("d", "d3", 0, 0), example("bad", "d3", 0, 0)];
        assert!(s.insert_all(&failing).is_err());
        assert_eq!(s.count().unwrap(), 3, "d was rolled back with the group");
        assert!(
            s.insert(&example("d", "d3", 0, 0)).unwrap(),
            "the store stays usable"
        );
    }

    #[test]
    fn exports_npy_for_retraining() {
        let s = Store::open(Path::new(":memory:")).unwrap();
        s.insert(&example("a", "d1", 3, 3)).unwrap();
        s.insert(&example("bb", "d1", 3, 8)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(s.export("digits-edge", dir.path(), false).unwrap(), 2);
        let inputs = Tensor::read_npy(&dir.path().join("inputs.npy")).unwrap();
        assert_eq!(inputs.shape(), &[2, 4]);
        let labels = Tensor::read_npy(&dir.path().join("labels.npy")).unwrap();
        assert_eq!(
            labels,
            Tensor::I64(ArrayD::from_shape_vec(vec![2], vec![3, 8]).unwrap())
        );
        assert_eq!(
            s.export("digits-edge", &dir.path().join("hard"), true)
                .unwrap(),
            1
        );
    }
}
