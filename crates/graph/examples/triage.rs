//! A support-ticket triage graph: classify, answer simple tickets, ask a human about the rest.
//!
//! Shows the whole API: nodes and `graph!`, a SQLite store, events, a human-in-the-loop
//! interrupt answered after a "restart", the history in pydantic_graph's JSON layout, and
//! Mermaid diagrams.
//!
//! ```text
//! cargo run -p deployd-graph --example triage
//! ```

use deployd_graph::store::SqliteStore;
use deployd_graph::{
    Ctx, Durability, End, Node, NodeError, Outcome, Runner, graph, mermaid, snapshot,
};
use serde::{Deserialize, Serialize};

/// The state: persisted with every step.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Ticket {
    text: String,
    category: Option<String>,
    reply: Option<String>,
}

/// Dependencies: never persisted (clients, configuration).
struct Deps {
    signature: String,
}

/// Nodes carry their inputs and are `Serialize + Deserialize`, so a run can be rebuilt from
/// its last snapshot.
#[derive(Serialize, Deserialize)]
struct Classify;

#[derive(Serialize, Deserialize)]
struct AutoReply {
    template: String,
}

#[derive(Serialize, Deserialize)]
struct Escalate;

/// What the graph asks a human, and what it expects back.
#[derive(Debug, Serialize, Deserialize)]
struct Question {
    ticket: String,
}

#[derive(Debug, Serialize, Deserialize)]
enum Decision {
    Refund,
    Reply(String),
}

graph! {
    /// Triage of a support ticket.
    Triage {
        state: Ticket,
        deps: Deps,
        output: String,
        event: String,
        nodes {
            /// Sorts the ticket.
            Classify => ClassifyNext [AutoReply "simple", Escalate "needs a human"],
            /// Replies from a template.
            AutoReply => AutoReplyNext [End],
            /// Asks a human what to do.
            Escalate => EscalateNext [End] asks Question => Decision,
        }
    }
}

impl Node<Triage> for Classify {
    async fn run(self, ctx: Ctx<'_, Triage>) -> Result<ClassifyNext, NodeError> {
        let simple = ctx.state.text.contains("password");
        ctx.state.category = Some(if simple { "account" } else { "billing" }.into());
        ctx.emit(format!("classified as {:?}", ctx.state.category));
        // `ClassifyNext` only converts from `AutoReply` and `Escalate`: returning any other
        // node, or `End`, does not compile.
        Ok(if simple {
            AutoReply {
                template: "Reset it at /account.".into(),
            }
            .into()
        } else {
            Escalate.into()
        })
    }
}

impl Node<Triage> for AutoReply {
    async fn run(self, ctx: Ctx<'_, Triage>) -> Result<AutoReplyNext, NodeError> {
        let reply = format!("{} {}", self.template, ctx.deps.signature);
        ctx.state.reply = Some(reply.clone());
        Ok(End(reply).into())
    }
}

impl Node<Triage> for Escalate {
    async fn run(self, ctx: Ctx<'_, Triage>) -> Result<EscalateNext, NodeError> {
        // First run: no answer yet, so ask. Once resumed with an answer, the node runs again.
        let reply = match ctx.answer::<Self>()? {
            None => {
                return Ok(EscalateNext::Interrupt(Question {
                    ticket: ctx.state.text.clone(),
                }));
            }
            Some(Decision::Refund) => "We refunded you.".to_owned(),
            Some(Decision::Reply(text)) => text,
        };
        let reply = format!("{reply} {}", ctx.deps.signature);
        ctx.state.reply = Some(reply.clone());
        Ok(End(reply).into())
    }
}

fn ticket(text: &str) -> Ticket {
    Ticket {
        text: text.into(),
        ..Ticket::default()
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("triage.db");
    let deps = || Deps {
        signature: "-- Support".into(),
    };

    // A runner: a store, the dependencies, and (optionally) where events go.
    let store = SqliteStore::open(&db, Durability::Immediate).await?;
    let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
    let runner = Runner::<Triage>::new(store, deps()).events(events);

    // 1. A simple ticket runs to the end.
    let done = runner.run(Classify, ticket("I forgot my password")).await?;
    if let Outcome::End(reply) = &done.outcome {
        println!("ticket 1 answered: {reply}");
    }
    while let Ok(event) = received.try_recv() {
        println!("  event from {}: {}", event.node_id, event.event);
    }

    // 2. Another one needs a human: the run stops, persisted, waiting for an answer.
    let waiting = runner.run(Classify, ticket("I was charged twice")).await?;
    let Outcome::Interrupted(question) = waiting.outcome else {
        return Err("expected a question".into());
    };
    println!(
        "ticket 2 asks: {:?} (interrupt {})",
        question.request::<Question>()?,
        question.id
    );
    drop(runner);

    // 3. Later, maybe in another process: reopen the store and answer.
    let store = SqliteStore::open(&db, Durability::Immediate).await?;
    let runner = Runner::<Triage>::new(store, deps());
    let done = runner
        .resume_with(&waiting.run_id, &question.id, Decision::Refund)
        .await?;
    if let Outcome::End(reply) = &done.outcome {
        println!("ticket 2 answered: {reply}");
    }
    // A second answer is refused.
    let again = runner
        .resume_with(&waiting.run_id, &question.id, Decision::Refund)
        .await;
    println!(
        "answering twice: {}",
        again.err().map(|e| e.to_string()).unwrap_or_default()
    );

    // 4. Every step is a snapshot, in pydantic_graph's JSON layout.
    let history = runner.store().history(&done.run_id).await?;
    for s in &history {
        println!(
            "  #{} {:<10} {:<8} attempt {}",
            s.seq, s.node_id, s.status, s.attempt
        );
    }
    let json = snapshot::to_json(&history[..1])?;
    println!("first snapshot:\n{json}");

    // 5. Diagrams: the graph, and this run over it.
    println!("{}", mermaid::graph::<Triage>(&mermaid::Options::default()));
    println!("{}", mermaid::run::<Triage>(&history));
    Ok(())
}
