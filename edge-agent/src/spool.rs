//! The durable store-and-forward queue for escalations.
//!
//! Every escalation is written to disk before it is sent and leaves only when its verdict has been
//! applied (the end-to-end acknowledgement, stronger than the broker's PUBACK), so neither a broker
//! outage, a broker that lost its sessions, nor a `kill -9` loses one, and none is applied twice:
//!
//! ```text
//!  <seq>-<id>.esc   written (tmp + fsync + rename) before publishing; republished after a
//!                   restart or a session the broker did not keep; removed once its verdict is applied
//!  applied.log      ids whose verdicts were applied (fsynced first), checked before applying one
//! ```
//!
//! Republishing can deliver an escalation twice; the escalator answers duplicates from its cache
//! and the agent applies each verdict once.
//!
//! A spool file is `u32 header length (LE) || header JSON || encoded escalation`. The spool is
//! bounded by bytes: when a new escalation does not fit, the oldest entries are dropped and
//! reported to the caller, which counts and logs them; nothing is dropped silently. Awaited
//! verdicts that never come are expired after a time limit, also reported.
//!
//! All I/O here is blocking and small; one task owns the spool.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// How many applied ids are remembered (for duplicates redelivered after a reconnect).
const APPLIED_MEMORY: usize = 10_000;

/// What the agent needs to know about an escalation when its verdict arrives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// The input's local id (file name, JSON id, frame window).
    pub input: String,
    /// When it was escalated, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// The edge model's answer.
    pub edge_class: u32,
    /// The edge model's confidence.
    pub edge_confidence: f32,
}

/// One stored escalation.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Spool order.
    pub seq: u64,
    /// Escalation id.
    pub id: Uuid,
    /// Bytes on disk.
    pub size: u64,
    /// What it is about.
    pub header: Header,
}

/// Why an entry left without its verdict being applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Dropped {
    /// The entry.
    pub entry: Entry,
    /// Why.
    pub reason: DropReason,
}

/// Why an entry was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The spool was full; the oldest entry made room.
    Full,
    /// Its verdict did not come in time.
    Expired,
    /// Its file could not be read back.
    Corrupt,
}

/// The spool. See the module documentation.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    fsync: bool,
    entries: BTreeMap<u64, Entry>,
    by_id: HashMap<Uuid, u64>,
    bytes: u64,
    next_seq: u64,
    applied: HashSet<Uuid>,
    applied_order: VecDeque<Uuid>,
}

fn file_name(seq: u64, id: Uuid) -> String {
    format!("{seq:020}-{id}.esc")
}

fn parse_name(name: &str) -> Option<(u64, Uuid)> {
    let stem = name.strip_suffix(".esc")?;
    let (seq, id) = stem.split_once('-')?;
    Some((seq.parse().ok()?, id.parse().ok()?))
}

fn read_header(path: &Path) -> io::Result<(Header, u64)> {
    let bytes = fs::read(path)?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed spool file");
    let len = u32::from_le_bytes(
        bytes
            .get(..4)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    ) as usize;
    let header: Header =
        serde_json::from_slice(bytes.get(4..4 + len).ok_or_else(bad)?).map_err(|_| bad())?;
    Ok((header, bytes.len() as u64))
}

impl Spool {
    /// Opens (or creates) a spool in `dir`, bounded to `max_bytes`. With `fsync`, every change is
    /// flushed to the disk before it is acted on (survives power loss, costs a disk flush).
    /// Returns the spool and the entries that could not be read back (reported, then removed).
    pub fn open(dir: &Path, max_bytes: u64, fsync: bool) -> io::Result<(Spool, Vec<Dropped>)> {
        fs::create_dir_all(dir)?;
        let mut spool = Spool {
            dir: dir.to_owned(),
            max_bytes,
            fsync,
            entries: BTreeMap::new(),
            by_id: HashMap::new(),
            bytes: 0,
            next_seq: 0,
            applied: HashSet::new(),
            applied_order: VecDeque::new(),
        };
        let mut corrupt = Vec::new();
        for item in fs::read_dir(dir)? {
            let path = item?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.ends_with(".tmp") {
                // A write interrupted before its rename: the escalation was never sent.
                fs::remove_file(&path)?;
                continue;
            }
            let Some((seq, id)) = parse_name(name) else {
                continue;
            };
            spool.next_seq = spool.next_seq.max(seq + 1);
            match read_header(&path) {
                Ok((header, size)) => {
                    spool.bytes += size;
                    spool.by_id.insert(id, seq);
                    spool.entries.insert(
                        seq,
                        Entry {
                            seq,
                            id,
                            size,
                            header,
                        },
                    );
                }
                Err(_) => {
                    let _ = fs::remove_file(&path);
                    corrupt.push(Dropped {
                        entry: Entry {
                            seq,
                            id,
                            size: 0,
                            header: Header {
                                input: String::new(),
                                created_ms: 0,
                                edge_class: 0,
                                edge_confidence: 0.0,
                            },
                        },
                        reason: DropReason::Corrupt,
                    });
                }
            }
        }
        spool.load_applied()?;
        Ok((spool, corrupt))
    }

    fn applied_path(&self) -> PathBuf {
        self.dir.join("applied.log")
    }

    fn load_applied(&mut self) -> io::Result<()> {
        let text = match fs::read_to_string(self.applied_path()) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let ids: Vec<Uuid> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        let keep = ids.len().saturating_sub(APPLIED_MEMORY);
        for id in &ids[keep..] {
            self.remember_applied(*id);
        }
        if keep > 0 {
            // Compact: rewrite the log with the ids still remembered.
            let tmp = self.dir.join("applied.log.tmp");
            let mut f = File::create(&tmp)?;
            for id in &self.applied_order {
                writeln!(f, "{id}")?;
            }
            f.sync_all()?;
            fs::rename(&tmp, self.applied_path())?;
        }
        Ok(())
    }

    fn remember_applied(&mut self, id: Uuid) {
        if self.applied.insert(id) {
            self.applied_order.push_back(id);
            if self.applied_order.len() > APPLIED_MEMORY
                && let Some(old) = self.applied_order.pop_front()
            {
                self.applied.remove(&old);
            }
        }
    }

    fn sync_dir(&self) -> io::Result<()> {
        if self.fsync {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    fn path(&self, entry: &Entry) -> PathBuf {
        self.dir.join(file_name(entry.seq, entry.id))
    }

    /// Stores an escalation durably before it is sent. Returns the entries dropped to make room.
    pub fn push(
        &mut self,
        id: Uuid,
        header: Header,
        escalation: &[u8],
    ) -> io::Result<Vec<Dropped>> {
        let header_json = serde_json::to_vec(&header).map_err(io::Error::other)?;
        let mut bytes = Vec::with_capacity(4 + header_json.len() + escalation.len());
        bytes.extend_from_slice(&(header_json.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&header_json);
        bytes.extend_from_slice(escalation);
        let size = bytes.len() as u64;
        let mut dropped = Vec::new();
        while self.bytes + size > self.max_bytes {
            let Some((&oldest, _)) = self.entries.iter().next() else {
                break;
            };
            if let Some(entry) = self.remove(oldest)? {
                dropped.push(Dropped {
                    entry,
                    reason: DropReason::Full,
                });
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let entry = Entry {
            seq,
            id,
            size,
            header,
        };
        let path = self.path(&entry);
        let tmp = path.with_extension("tmp");
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(&bytes)?;
        if self.fsync {
            f.sync_all()?;
        }
        fs::rename(&tmp, &path)?;
        self.sync_dir()?;
        self.bytes += size;
        self.by_id.insert(id, seq);
        self.entries.insert(seq, entry);
        Ok(dropped)
    }

    fn remove(&mut self, seq: u64) -> io::Result<Option<Entry>> {
        let Some(entry) = self.entries.remove(&seq) else {
            return Ok(None);
        };
        self.by_id.remove(&entry.id);
        self.bytes -= entry.size;
        match fs::remove_file(self.path(&entry)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(Some(entry))
    }

    /// Whether escalation `id`'s verdict was already applied.
    pub fn is_applied(&self, id: &Uuid) -> bool {
        self.applied.contains(id)
    }

    /// The entry for escalation `id`, if it is waiting.
    pub fn get(&self, id: &Uuid) -> Option<&Entry> {
        self.by_id.get(id).and_then(|seq| self.entries.get(seq))
    }

    /// Records that `id`'s verdict is applied (durably, first) and forgets the escalation.
    pub fn complete(&mut self, id: Uuid) -> io::Result<Option<Entry>> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.applied_path())?;
        writeln!(log, "{id}")?;
        if self.fsync {
            log.sync_all()?;
        }
        self.remember_applied(id);
        match self.by_id.get(&id).copied() {
            Some(seq) => self.remove(seq),
            None => Ok(None),
        }
    }

    /// The encoded escalation `id`, if it still awaits its verdict.
    pub fn read(&self, id: &Uuid) -> io::Result<Option<Vec<u8>>> {
        let Some(entry) = self.get(id) else {
            return Ok(None);
        };
        let bytes = fs::read(self.path(entry))?;
        let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        Ok(Some(bytes[4 + len..].to_vec()))
    }

    /// Ids awaiting their verdict, oldest first.
    pub fn ids(&self) -> Vec<Uuid> {
        self.entries.values().map(|e| e.id).collect()
    }

    /// Escalations awaiting their verdict, oldest first, with their encoded bytes (for replay).
    pub fn outstanding(&self) -> io::Result<Vec<(Uuid, Vec<u8>)>> {
        let mut out = Vec::new();
        for entry in self.entries.values() {
            let bytes = fs::read(self.path(entry))?;
            let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
            out.push((entry.id, bytes[4 + len..].to_vec()));
        }
        Ok(out)
    }

    /// Drops escalations created before `created_before_ms` that never got a verdict.
    pub fn expire(&mut self, created_before_ms: u64) -> io::Result<Vec<Dropped>> {
        let old: Vec<u64> = self
            .entries
            .values()
            .filter(|e| e.header.created_ms < created_before_ms)
            .map(|e| e.seq)
            .collect();
        let mut dropped = Vec::new();
        for seq in old {
            if let Some(entry) = self.remove(seq)? {
                dropped.push(Dropped {
                    entry,
                    reason: DropReason::Expired,
                });
            }
        }
        Ok(dropped)
    }

    /// Entries stored (pending and awaiting verdicts).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes stored.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(input: &str, created_ms: u64) -> Header {
        Header {
            input: input.into(),
            created_ms,
            edge_class: 3,
            edge_confidence: 0.4,
        }
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn survives_a_restart_in_every_state() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open(dir.path(), 1 << 20, true).unwrap();
            s.push(id(1), header("a", 1), b"one").unwrap();
            s.push(id(2), header("b", 2), b"two").unwrap();
            s.push(id(3), header("c", 3), b"three").unwrap();
            s.complete(id(3)).unwrap();
        }
        let (s, corrupt) = Spool::open(dir.path(), 1 << 20, true).unwrap();
        assert!(corrupt.is_empty());
        let outstanding = s.outstanding().unwrap();
        assert_eq!(
            outstanding,
            vec![(id(1), b"one".to_vec()), (id(2), b"two".to_vec())],
            "everything without a verdict is replayed, oldest first"
        );
        assert_eq!(s.get(&id(2)).unwrap().header.input, "b");
        assert!(s.is_applied(&id(3)) && s.get(&id(3)).is_none());
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn a_full_spool_drops_the_oldest_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(dir.path(), 300, false).unwrap();
        let mut dropped = Vec::new();
        for n in 0..5 {
            dropped.extend(s.push(id(n), header("x", n as u64), &[0u8; 60]).unwrap());
        }
        assert!(s.bytes() <= 300);
        assert!(!dropped.is_empty());
        assert_eq!(dropped[0].entry.id, id(0), "oldest first");
        assert!(dropped.iter().all(|d| d.reason == DropReason::Full));
        assert!(s.get(&id(4)).is_some(), "the newest is kept");
    }

    #[test]
    fn interrupted_writes_and_garbage_are_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path()
                .join("00000000000000000007-00000000-0000-0000-0000-000000000009.tmp"),
            b"half",
        )
        .unwrap();
        fs::write(
            dir.path()
                .join("00000000000000000008-00000000-0000-0000-0000-000000000008.esc"),
            b"\xff\xff",
        )
        .unwrap();
        let (s, corrupt) = Spool::open(dir.path(), 1 << 20, true).unwrap();
        assert!(s.is_empty());
        assert_eq!(corrupt.len(), 1);
        assert_eq!(corrupt[0].reason, DropReason::Corrupt);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "both removed");
    }

    #[test]
    fn unanswered_escalations_expire() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(dir.path(), 1 << 20, false).unwrap();
        s.push(id(1), header("a", 100), b"x").unwrap();
        s.push(id(2), header("b", 900), b"y").unwrap();
        let dropped = s.expire(500).unwrap();
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].entry.id, id(1));
        assert_eq!(dropped[0].reason, DropReason::Expired);
        assert!(s.get(&id(2)).is_some());
    }

    #[test]
    fn the_applied_log_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let lines: String = (0..(APPLIED_MEMORY as u128 + 50))
            .map(|n| format!("{}\n", id(n)))
            .collect();
        fs::write(dir.path().join("applied.log"), lines).unwrap();
        let (s, _) = Spool::open(dir.path(), 1 << 20, false).unwrap();
        assert!(!s.is_applied(&id(0)), "the oldest are forgotten");
        assert!(s.is_applied(&id(APPLIED_MEMORY as u128 + 49)));
        let kept = fs::read_to_string(dir.path().join("applied.log"))
            .unwrap()
            .lines()
            .count();
        assert_eq!(kept, APPLIED_MEMORY);
    }
}
