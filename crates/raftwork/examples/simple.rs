//! One durable node: propose a few commands and read them back.
//!
//! Shows: the builder in a few lines (durable by default: the WAL and
//! snapshots go to `./raftwork-data`), `propose` returning the log index and
//! the state machine's response, and a linearizable `read`. Run it twice: the
//! second run starts from the first run's state (see the run counter).
//!
//! Run: `cargo run -p raftwork --example simple`

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use raftwork::{Builder, Command, StateMachine};

/// A tiny replicated map: commands are `key=value`.
#[derive(Default)]
struct Map(BTreeMap<String, String>);

impl StateMachine for Map {
    /// The previous value of the key, if any.
    type Response = Option<String>;

    fn apply(&mut self, commands: &[Command<'_>]) -> Vec<Option<String>> {
        commands
            .iter()
            .map(|c| {
                let text = String::from_utf8_lossy(c.data);
                let (k, v) = text.split_once('=').unwrap_or((&text, ""));
                self.0.insert(k.to_string(), v.to_string())
            })
            .collect()
    }

    fn snapshot(&self, w: &mut dyn Write) -> std::io::Result<()> {
        for (k, v) in &self.0 {
            writeln!(w, "{k}={v}")?;
        }
        Ok(())
    }

    fn restore(&mut self, r: &mut dyn Read) -> std::io::Result<()> {
        let mut text = String::new();
        r.read_to_string(&mut text)?;
        self.0 = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let node = Builder::new(1, Map::default())
        .data_dir("./raftwork-data")
        .build()?;
    node.wait_for_leader(Duration::from_secs(10)).await?;

    let runs: u64 = node
        .read(|m: &Map| m.0.get("runs").and_then(|v| v.parse().ok()))
        .await?
        .unwrap_or(0);
    node.propose(format!("runs={}", runs + 1)).await?;
    println!("run number {} on ./raftwork-data", runs + 1);

    let (index, previous) = node.propose("greeting=hello").await?;
    println!("greeting=hello committed at index {index} (previous: {previous:?})");
    let (index, previous) = node.propose("greeting=bonjour").await?;
    println!("greeting=bonjour committed at index {index} (previous: {previous:?})");

    let value = node.read(|m: &Map| m.0.get("greeting").cloned()).await?;
    println!("linearizable read: greeting = {value:?}");
    assert_eq!(value.as_deref(), Some("bonjour"));

    node.shutdown().await;
    Ok(())
}
