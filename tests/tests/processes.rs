//! Real processes killed with SIGKILL: an `edge-agent run` mid-stream, and one of two
//! `cloud-escalator serve` replicas sharing the load on Mosquitto.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cascade_e2e::Mosquitto;
use cascade_e2e::fixtures::{agent_toml, binary, digits, escalator_toml, eventually, init_logs};
use edge_agent::config::AgentConfig;
use edge_agent::input::{InputItem, ResultEvent, Stage};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A child process killed (SIGKILL) on drop, so a failing test leaves nothing running.
struct Process(Child);

impl Process {
    fn spawn(command: &mut Command) -> Self {
        Process(
            command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("process starts"),
        )
    }

    /// SIGKILL: no shutdown path runs, nothing is flushed.
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read_jsonl(path: &Path) -> Vec<ResultEvent> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        // A line cut short by SIGKILL is not a result.
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The escalations that reached an end (a verdict applied, or a rejection or drop reported).
fn terminal_ids(events: &[ResultEvent]) -> HashSet<Uuid> {
    events
        .iter()
        .filter(|e| e.stage != Stage::Edge)
        .filter_map(|e| e.escalation)
        .collect()
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn agent_process(config: &Path) -> Process {
    Process::spawn(
        Command::new(binary("edge-agent"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_with_sigkill_loses_no_input_and_applies_no_verdict_twice() {
    init_logs();
    let broker = Mosquitto::start().expect("mosquitto");
    let state = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    // Verdicts come in slow batches, so escalations are waiting in the spool when the agent dies.
    let mut escalator: cloud_escalator::config::EscalatorConfig = toml::from_str(&escalator_toml(
        &broker.url(),
        "escalator-kill",
        &state.path().join("examples.db"),
    ))
    .unwrap();
    escalator.batching.max_batch = 64;
    escalator.batching.max_delay_us = 700_000;
    let escalator = cloud_escalator::service::start(escalator, shutdown.child_token())
        .await
        .expect("escalator starts");

    let inbox = state.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let results = state.path().join("results.jsonl");
    let config = state.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n[output]\njsonl = {results:?}\n\n[sources.directory]\npath = {inbox:?}\npoll_ms = 20\n",
            agent_toml("killed", &broker.url(), &state.path().join("agent"))
        ),
    )
    .unwrap();
    let write_inputs = |range: std::ops::Range<usize>| {
        for (i, t) in digits(range.end).into_iter().enumerate().skip(range.start) {
            // Written aside and renamed, as a producer should, so no half file is read.
            let tmp = state.path().join(format!("{i:03}.npy"));
            t.write_npy(&tmp).unwrap();
            std::fs::rename(&tmp, inbox.join(format!("{i:03}.npy"))).unwrap();
        }
    };

    let mut agent = agent_process(&config);
    write_inputs(0..40);
    // Kill it once some verdicts are applied and others are still awaited.
    assert!(
        eventually(Duration::from_secs(60), || {
            read_jsonl(&results)
                .iter()
                .filter(|e| e.stage == Stage::Cloud)
                .count()
                >= 5
        })
        .await,
        "no verdict before the kill"
    );
    agent.kill();
    let before: Vec<ResultEvent> = read_jsonl(&results);
    let applied_before = before.iter().filter(|e| e.stage == Stage::Cloud).count();
    let escalated_before = before
        .iter()
        .filter(|e| e.stage == Stage::Edge && e.escalation.is_some())
        .count();
    assert!(
        applied_before < escalated_before,
        "the kill should catch verdicts in flight ({applied_before} of {escalated_before} applied)"
    );

    write_inputs(40..60);
    let mut agent = agent_process(&config);
    let all_in = |names: &[String]| (0..60).all(|i| names.contains(&format!("{i:03}.npy")));
    let settled = || {
        let events = read_jsonl(&results);
        let terminal = terminal_ids(&events);
        let answered_inputs: HashSet<&str> = events
            .iter()
            .filter(|e| e.stage == Stage::Edge)
            .filter(|e| e.escalation.is_some_and(|id| terminal.contains(&id)))
            .map(|e| e.input.as_str())
            .collect();
        answered_inputs.len() == 60 && all_in(&files_in(&inbox.join("processed")))
    };
    if !eventually(Duration::from_secs(90), settled).await {
        // What a failure needs to be understood: which inputs, and where each one's files are.
        let events = read_jsonl(&results);
        let answered = terminal_ids(&events);
        let unanswered: Vec<(&str, Option<Uuid>)> = events
            .iter()
            .filter(|e| e.stage == Stage::Edge)
            .filter(|e| !e.escalation.is_some_and(|id| answered.contains(&id)))
            .map(|e| (e.input.as_str(), e.escalation))
            .collect();
        let seen: HashSet<&str> = events.iter().map(|e| e.input.as_str()).collect();
        let never_seen: Vec<String> = (0..60)
            .map(|i| format!("{i:03}.npy"))
            .filter(|name| !seen.iter().any(|input| input.ends_with(name.as_str())))
            .collect();
        panic!(
            "not every input got its verdict after the restart: edge results without a verdict \
             {unanswered:?}; inputs without any result {never_seen:?}; inbox {:?}, processing \
             {:?}, failed {:?}, {} processed",
            files_in(&inbox),
            files_in(&inbox.join("processing")),
            files_in(&inbox.join("failed")),
            files_in(&inbox.join("processed")).len(),
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // late duplicates, if any
    agent.kill();

    let events = read_jsonl(&results);
    assert!(files_in(&inbox).is_empty(), "inputs left untaken");
    assert!(files_in(&inbox.join("processing")).is_empty());
    assert!(files_in(&inbox.join("failed")).is_empty());
    let mut terminal: HashMap<Uuid, usize> = HashMap::new();
    for e in events.iter().filter(|e| e.stage != Stage::Edge) {
        assert_eq!(e.stage, Stage::Cloud, "nothing rejected or dropped: {e:?}");
        *terminal.entry(e.escalation.unwrap()).or_default() += 1;
    }
    assert!(
        terminal.values().all(|&n| n == 1),
        "a verdict applied twice: {terminal:?}"
    );
    // Every escalation that survived in the spool was answered after the restart, by republishing
    // or from the broker's stored session.
    assert!(terminal.len() > applied_before);
    assert!(escalator.stats.answered.load(Relaxed) >= terminal.len() as u64);
    assert!(escalator.stop(Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_escalator_replicas_share_the_load_and_one_dying_loses_nothing() {
    init_logs();
    let broker = Mosquitto::start().expect("mosquitto");
    let state = tempfile::tempdir().unwrap();
    let replica = |name: &str| -> (Process, PathBuf) {
        let store = state.path().join(format!("{name}.db"));
        let config = state.path().join(format!("{name}.toml"));
        // Slow batches keep escalations in flight at the replica when it is killed.
        let text = escalator_toml(&broker.url(), name, &store)
            .replace("max_delay_us = 1000", "max_delay_us = 200000");
        std::fs::write(&config, text).unwrap();
        let process = Process::spawn(
            Command::new(binary("cloud-escalator"))
                .args(["serve", "--config"])
                .arg(&config)
                .env("RUST_LOG", "warn"),
        );
        (process, store)
    };
    let (mut first, first_store) = replica("replica-a");
    let (_second, second_store) = replica("replica-b");
    // Both subscribed before the agent sends (a replica that joins late only gets less load).
    tokio::time::sleep(Duration::from_secs(2)).await;

    let shutdown = CancellationToken::new();
    let config: AgentConfig = toml::from_str(&agent_toml(
        "replicated",
        &broker.url(),
        &state.path().join("agent"),
    ))
    .unwrap();
    let mut agent = edge_agent::agent::start(config, shutdown.child_token())
        .await
        .unwrap();
    let mut rx = agent.take_results().unwrap();
    let events: Arc<Mutex<Vec<ResultEvent>>> = Arc::default();
    let sink = events.clone();
    tokio::spawn(async move {
        while let Some(e) = rx.recv().await {
            sink.lock().unwrap().push(e);
        }
    });
    let cloud = |events: &Arc<Mutex<Vec<ResultEvent>>>| {
        events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.stage == Stage::Cloud)
            .count()
    };

    let total = 120;
    let inputs = digits(total);
    let sender = agent.inputs.clone();
    let feeder = tokio::spawn(async move {
        for (i, t) in inputs.into_iter().enumerate() {
            sender
                .send(InputItem::new(format!("in-{i}"), vec![t]))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    });
    assert!(eventually(Duration::from_secs(30), || cloud(&events) >= 30).await);
    first.kill();
    feeder.await.unwrap();
    assert!(
        eventually(Duration::from_secs(60), || cloud(&events) >= total).await,
        "verdicts after one replica died: {}",
        cloud(&events)
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    let events = events.lock().unwrap().clone();
    let escalated: HashSet<Uuid> = events
        .iter()
        .filter(|e| e.stage == Stage::Edge)
        .filter_map(|e| e.escalation)
        .collect();
    let mut applied: HashMap<Uuid, usize> = HashMap::new();
    for e in events.iter().filter(|e| e.stage == Stage::Cloud) {
        *applied.entry(e.escalation.unwrap()).or_default() += 1;
    }
    assert_eq!(escalated.len(), total);
    assert_eq!(
        applied.keys().copied().collect::<HashSet<_>>(),
        escalated,
        "every escalation answered"
    );
    assert!(applied.values().all(|&n| n == 1), "a verdict applied twice");

    // Both replicas did part of the work, and between them every escalation was kept.
    let stored = |path: &Path| {
        let store = cloud_escalator::store::Store::open(path).unwrap();
        store.count().unwrap()
    };
    let (a, b) = (stored(&first_store), stored(&second_store));
    assert!(a > 0 && b > 0, "the load was not shared: {a} and {b}");
    assert!(
        a + b >= total as u64,
        "{a} + {b} examples for {total} escalations"
    );
    assert!(agent.stop(Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_download_resumes_without_refetching_and_switches() {
    use cascade_proto::model::Version;
    use cascade_proto::ota::OtaState;
    use cascade_proto::signing::SigningKey;
    use cloud_escalator::registry::{Registry, parse_target};

    init_logs();
    let broker = Mosquitto::start().expect("mosquitto");
    let state = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[5; 32]);
    // A 606 KB model in 1 KiB chunks, fetched one at a time: slow enough to kill mid-way.
    let registry = Registry::open(&state.path().join("registry")).unwrap();
    let signed = registry
        .publish(
            &cascade_e2e::fixtures::model("digits-cloud.onnx"),
            "digits-edge",
            Version::new(2, 0, 0),
            parse_target("all", "digits-edge").unwrap(),
            &key,
            1024,
        )
        .unwrap();
    let total = signed.content.full.chunk_count();
    let escalator = cloud_escalator::service::start(
        toml::from_str(&format!(
            "{}\n[ota]\nregistry = {:?}\nrescan_ms = 200\n",
            escalator_toml(
                &broker.url(),
                "escalator-ota-kill",
                &state.path().join("ex.db")
            ),
            state.path().join("registry")
        ))
        .unwrap(),
        CancellationToken::new(),
    )
    .await
    .expect("escalator starts");
    let agent_state = state.path().join("agent");
    let config = state.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "trusted_keys = [\"{}\"]\n{}\n[ota]\nwindow = 1\n",
            hex::encode(key.verifying_key().as_bytes()),
            agent_toml("ota-kill", &broker.url(), &agent_state)
        ),
    )
    .unwrap();
    let have_path = agent_state.join("ota/download/model.have");
    let on_disk = || {
        std::fs::read(&have_path)
            .map(|h| h.iter().filter(|b| **b == 1).count() as u64)
            .unwrap_or(0)
    };

    let mut agent = agent_process(&config);
    assert!(
        eventually(Duration::from_secs(30), || on_disk() >= 50).await,
        "the download started"
    );
    agent.kill();
    let kept = on_disk();
    let served_before = escalator.ota.chunks.load(Relaxed);
    assert!(
        kept < total,
        "killed mid-download ({kept} of {total} chunks on disk)"
    );

    let _agent = agent_process(&config);
    let active = agent_state.join("models/active.toml");
    assert!(
        eventually(Duration::from_secs(60), || active.exists()).await,
        "the resumed download completes and the agent switches"
    );
    assert!(
        eventually(Duration::from_secs(10), || matches!(
            escalator
                .ota
                .statuses()
                .get("ota-kill")
                .map(|s| s.state.clone()),
            Some(OtaState::Activated)
        ))
        .await
    );
    let served = escalator.ota.chunks.load(Relaxed);
    // What was on disk is not sent again: the restart needs the rest, plus at most a few
    // re-requests of chunks in flight at the kill.
    assert!(
        served <= served_before + (total - kept) + 4,
        "{served} chunks served for {total}: {served_before} before the kill, {kept} kept"
    );
    assert_eq!(
        std::fs::read(agent_state.join("models/digits-edge-2.0.0/model")).unwrap(),
        std::fs::read(cascade_e2e::fixtures::model("digits-cloud.onnx")).unwrap()
    );
    assert!(escalator.stop(Duration::from_secs(5)).await);
}
