//! Typed commands: declare the command and response types with serde, and
//! raftwork encodes them in the log and hands `apply` decoded values.
//!
//! Shows: `TypedStateMachine`, `Typed::new`, `propose_typed` returning the
//! typed response, and a command version for a variant added later.
//!
//! Run: `cargo run -p raftwork --example typed`

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use raftwork::{Builder, Typed, TypedCommand, TypedStateMachine};
use serde::{Deserialize, Serialize};

/// The commands. New variants go at the end (postcard numbers them by
/// position), with a new version (see `command_version`).
#[derive(Debug, Serialize, Deserialize)]
enum Cmd {
    Set {
        key: String,
        value: String,
    },
    Remove {
        key: String,
    },
    /// Added in version 2: members still on version 1 refuse it.
    Append {
        key: String,
        suffix: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
enum Answer {
    /// The value before the command.
    Previous(Option<String>),
}

#[derive(Default)]
struct Map(BTreeMap<String, String>);

impl TypedStateMachine for Map {
    type Command = Cmd;
    type Response = Answer;
    const VERSION: u16 = 2;

    fn command_version(command: &Cmd) -> u16 {
        match command {
            Cmd::Append { .. } => 2,
            _ => 1,
        }
    }

    fn apply(&mut self, commands: Vec<TypedCommand<Cmd>>) -> Vec<Answer> {
        commands
            .into_iter()
            .map(|c| match c.command {
                Cmd::Set { key, value } => Answer::Previous(self.0.insert(key, value)),
                Cmd::Remove { key } => Answer::Previous(self.0.remove(&key)),
                Cmd::Append { key, suffix } => {
                    let value = self.0.entry(key).or_default();
                    let previous = value.clone();
                    value.push_str(&suffix);
                    Answer::Previous(Some(previous))
                }
            })
            .collect()
    }

    fn snapshot(&self, w: &mut dyn Write) -> std::io::Result<()> {
        for (k, v) in &self.0 {
            writeln!(w, "{k}\t{v}")?;
        }
        Ok(())
    }

    fn restore(&mut self, r: &mut dyn Read) -> std::io::Result<()> {
        let mut text = String::new();
        r.read_to_string(&mut text)?;
        self.0 = text
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let node = Builder::new(1, Typed::new(Map::default()))
        .in_memory()
        .build()?;
    node.wait_for_leader(Duration::from_secs(10)).await?;

    let set = Cmd::Set {
        key: "greeting".into(),
        value: "hello".into(),
    };
    let (index, answer) = node.propose_typed(&set).await?;
    println!("{set:?} applied at index {index}: {answer:?}");
    let append = Cmd::Append {
        key: "greeting".into(),
        suffix: ", world".into(),
    };
    let (index, answer) = node.propose_typed(&append).await?;
    println!("{append:?} applied at index {index}: {answer:?}");

    let value = node
        .read(|m: &Typed<Map>| m.0.get("greeting").cloned())
        .await?;
    println!("linearizable read: greeting = {value:?}");
    assert_eq!(value.as_deref(), Some("hello, world"));
    node.shutdown().await;
    Ok(())
}
