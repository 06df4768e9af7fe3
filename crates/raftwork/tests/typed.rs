//! Typed commands: decoded values in `apply`, typed responses, and a
//! command of a newer version that an older member cannot read: it gets a
//! clear error, the member goes on, and what it can read keeps applying.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};

use common::{init_logging, WAIT};
use raftwork::{
    Builder, CommandError, MemNetwork, Node, NodeId, Typed, TypedCommand, TypedProposeError,
    TypedStateMachine,
};
use serde::{Deserialize, Serialize};

/// The first version's commands.
#[derive(Debug, Serialize, Deserialize)]
enum CommandV1 {
    Deposit { account: String, amount: u64 },
    Withdraw { account: String, amount: u64 },
}

/// The second version: a variant added at the end.
#[derive(Debug, Serialize, Deserialize)]
enum CommandV2 {
    Deposit {
        account: String,
        amount: u64,
    },
    Withdraw {
        account: String,
        amount: u64,
    },
    Transfer {
        from: String,
        to: String,
        amount: u64,
    },
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Reply {
    Balance(u64),
    Insufficient { balance: u64 },
}

#[derive(Default)]
struct Accounts(BTreeMap<String, u64>);

impl Accounts {
    fn deposit(&mut self, account: String, amount: u64) -> Reply {
        let b = self.0.entry(account).or_default();
        *b += amount;
        Reply::Balance(*b)
    }

    fn withdraw(&mut self, account: String, amount: u64) -> Reply {
        let b = self.0.entry(account).or_default();
        if *b < amount {
            return Reply::Insufficient { balance: *b };
        }
        *b -= amount;
        Reply::Balance(*b)
    }

    fn snapshot(&self, w: &mut dyn Write) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(&self.0).map_err(std::io::Error::other)?;
        w.write_all(&bytes)
    }

    fn restore(&mut self, r: &mut dyn Read) -> std::io::Result<()> {
        self.0 = serde_json::from_reader(r).map_err(std::io::Error::other)?;
        Ok(())
    }
}

#[derive(Default)]
struct BankV1(Accounts);

impl TypedStateMachine for BankV1 {
    type Command = CommandV1;
    type Response = Reply;
    const VERSION: u16 = 1;

    fn apply(&mut self, commands: Vec<TypedCommand<CommandV1>>) -> Vec<Reply> {
        commands
            .into_iter()
            .map(|c| match c.command {
                CommandV1::Deposit { account, amount } => self.0.deposit(account, amount),
                CommandV1::Withdraw { account, amount } => self.0.withdraw(account, amount),
            })
            .collect()
    }

    fn snapshot(&self, w: &mut dyn Write) -> std::io::Result<()> {
        self.0.snapshot(w)
    }

    fn restore(&mut self, r: &mut dyn Read) -> std::io::Result<()> {
        self.0.restore(r)
    }
}

#[derive(Default)]
struct BankV2(Accounts);

impl TypedStateMachine for BankV2 {
    type Command = CommandV2;
    type Response = Reply;
    const VERSION: u16 = 2;

    fn command_version(command: &CommandV2) -> u16 {
        match command {
            CommandV2::Transfer { .. } => 2,
            _ => 1,
        }
    }

    fn apply(&mut self, commands: Vec<TypedCommand<CommandV2>>) -> Vec<Reply> {
        commands
            .into_iter()
            .map(|c| match c.command {
                CommandV2::Deposit { account, amount } => self.0.deposit(account, amount),
                CommandV2::Withdraw { account, amount } => self.0.withdraw(account, amount),
                CommandV2::Transfer { from, to, amount } => match self.0.withdraw(from, amount) {
                    Reply::Balance(_) => self.0.deposit(to, amount),
                    refused => refused,
                },
            })
            .collect()
    }

    fn snapshot(&self, w: &mut dyn Write) -> std::io::Result<()> {
        self.0.snapshot(w)
    }

    fn restore(&mut self, r: &mut dyn Read) -> std::io::Result<()> {
        self.0.restore(r)
    }
}

fn start<T: TypedStateMachine + Default>(net: &MemNetwork, id: NodeId) -> Node<Typed<T>> {
    let (transport, inbox) = net.join(id);
    Builder::new(id, Typed::new(T::default()))
        .in_memory()
        .transport(transport, inbox)
        .initial_voters([1, 2, 3])
        .configure(|c| c.tick_interval = common::TICK)
        .build()
        .unwrap()
}

async fn balances<T: TypedStateMachine>(
    node: &Node<Typed<T>>,
    accounts: fn(&T) -> &Accounts,
) -> (BTreeMap<String, u64>, u64) {
    node.read(move |sm: &Typed<T>| (accounts(sm).0.clone(), sm.refused()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_commands_apply_and_an_older_member_refuses_a_newer_one_and_goes_on() {
    init_logging();
    let net = MemNetwork::new();
    let n1 = start::<BankV2>(&net, 1);
    let n2 = start::<BankV2>(&net, 2);
    let n3 = start::<BankV1>(&net, 3);
    let mut leader = n1.wait_for_leader(WAIT).await.unwrap();
    if leader == 3 {
        n3.transfer_leader(1).await.unwrap();
        leader = n1.wait_for_leader(WAIT).await.unwrap();
        while leader == 3 {
            tokio::time::sleep(common::TICK).await;
            leader = n1.wait_for_leader(WAIT).await.unwrap();
        }
    }
    let new = if leader == 1 { &n1 } else { &n2 };

    let deposit = |account: &str, amount| CommandV2::Deposit {
        account: account.into(),
        amount,
    };
    assert_eq!(
        new.propose_typed(&deposit("alice", 100)).await.unwrap().1,
        Reply::Balance(100)
    );
    let withdraw = CommandV2::Withdraw {
        account: "bob".into(),
        amount: 1,
    };
    assert_eq!(
        new.propose_typed(&withdraw).await.unwrap().1,
        Reply::Insufficient { balance: 0 }
    );
    // A version-2 command: the version-1 member refuses it.
    let transfer = CommandV2::Transfer {
        from: "alice".into(),
        to: "bob".into(),
        amount: 30,
    };
    let (index, reply) = new.propose_typed(&transfer).await.unwrap();
    assert_eq!(reply, Reply::Balance(30));
    // Raw bytes that are no typed command at all: refused on every member.
    let (garbage_index, raw) = new.propose(b"not a typed command".to_vec()).await.unwrap();
    assert!(matches!(
        raw.0,
        Err(CommandError::Undecodable { index, .. }) if index == garbage_index
    ));
    // The old member goes on applying what it can read.
    let (last, _) = new.propose_typed(&deposit("carol", 7)).await.unwrap();
    assert!(last > index);
    let deadline = tokio::time::Instant::now() + WAIT;
    while n3.status().await.unwrap().applied_index < last {
        assert!(tokio::time::Instant::now() < deadline, "n3 stuck");
        tokio::time::sleep(common::TICK).await;
    }
    assert_eq!(n3.stop_reason(), None, "the old member is running");
    let (old, refused) = balances(&n3, |b: &BankV1| &b.0).await;
    assert_eq!(refused, 2, "the transfer and the garbage");
    assert_eq!(
        old["alice"], 100,
        "the old member did not apply the transfer"
    );
    assert_eq!(old["carol"], 7);
    let (current, refused) = balances(new, |b: &BankV2| &b.0).await;
    assert_eq!(refused, 1, "the garbage only");
    assert_eq!((current["alice"], current["bob"]), (70, 30));

    // An older node proposing: its own commands are version 1 and apply.
    if let Ok((_, reply)) = n3
        .propose_typed(&CommandV1::Deposit {
            account: "dave".into(),
            amount: 1,
        })
        .await
    {
        assert_eq!(reply, Reply::Balance(1));
    } else {
        // n3 does not lead: the proposal fails fast, as any other.
        let err = n3
            .propose_typed(&CommandV1::Withdraw {
                account: "dave".into(),
                amount: 1,
            })
            .await
            .unwrap_err();
        assert!(matches!(err, TypedProposeError::Propose(_)), "{err}");
    }
    for n in [&n1, &n2] {
        n.shutdown().await;
    }
    n3.shutdown().await;
}

/// What a member that refused a command answers the node that proposed it
/// there: the typed error, not a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_old_node_answers_a_newer_command_with_an_error() {
    init_logging();
    let node = Builder::new(1, Typed::new(BankV1::default()))
        .in_memory()
        .initial_voters([1])
        .configure(|c| c.tick_interval = common::TICK)
        .build()
        .unwrap();
    node.wait_for_leader(WAIT).await.unwrap();
    let entry = raftwork::encode_command::<BankV2>(&CommandV2::Transfer {
        from: "a".into(),
        to: "b".into(),
        amount: 1,
    })
    .unwrap();
    let (index, reply) = node.propose(entry).await.unwrap();
    assert_eq!(
        reply.0,
        Err(CommandError::NewerVersion {
            index,
            version: 2,
            known: 1
        })
    );
    let (_, reply) = node
        .propose_typed(&CommandV1::Deposit {
            account: "a".into(),
            amount: 5,
        })
        .await
        .unwrap();
    assert_eq!(reply, Reply::Balance(5));
    node.shutdown().await;
}
