//! Measures how many messages per second go through a [`MemoryQueue`]: publish, receive, ack.
//!
//! `cargo run --release -p deployd-queue --example memory_throughput [messages]`
//!
//! Prints one line per scenario; it asserts nothing (timing assertions belong to no test).

use std::time::{Duration, Instant};

use deployd_queue::memory::MemoryQueue;
use deployd_queue::{Error, Message, MessageQueue, SubscribeOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let count: usize = match std::env::args().nth(1) {
        Some(arg) => match arg.parse::<usize>() {
            Ok(0) => {
                eprintln!("error: the message count must be at least 1");
                std::process::exit(2);
            }
            Ok(count) => count,
            Err(err) => {
                eprintln!("error: invalid message count `{arg}`: {err}");
                std::process::exit(2);
            }
        },
        None => 1_000_000,
    };
    let payload = bytes::Bytes::from_static(b"{\"task\": \"benchmark\"}");

    // What the messages themselves cost (`Message::new` draws a UUID v7).
    let start = Instant::now();
    let messages: Vec<Message> = (0..count).map(|_| Message::new(payload.clone())).collect();
    report("Message::new alone", count, start.elapsed());

    // Publish everything, then receive and ack everything, with one consumer.
    let queue = MemoryQueue::new();
    let mut consumer = queue
        .subscribe("bench.backlog", "workers", SubscribeOptions::default())
        .await?;
    let start = Instant::now();
    for message in messages {
        queue.publish("bench.backlog", message).await?;
    }
    let published = start.elapsed();
    report("backlog: publish premade", count, published);
    let start = Instant::now();
    for _ in 0..count {
        consumer.next().await?.ack().await?;
    }
    let consumed = start.elapsed();
    report("backlog: receive + ack", count, consumed);
    report(
        "backlog: publish + receive + ack",
        count,
        published + consumed,
    );

    // Publish one, receive it, ack it, repeat: the consumer never finds a backlog.
    let mut consumer = queue
        .subscribe("bench.lockstep", "workers", SubscribeOptions::default())
        .await?;
    let start = Instant::now();
    for _ in 0..count {
        queue
            .publish("bench.lockstep", Message::new(payload.clone()))
            .await?;
        consumer.next().await?.ack().await?;
    }
    report("lockstep, 1 consumer", count, start.elapsed());

    // A publishing task and four consuming tasks on one thread.
    let mut consumers = tokio::task::JoinSet::new();
    let remaining = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(count));
    for _ in 0..4 {
        let mut consumer = queue
            .subscribe("bench.tasks", "workers", SubscribeOptions::default())
            .await?;
        let remaining = remaining.clone();
        let closer = queue.clone();
        consumers.spawn(async move {
            loop {
                let delivery = match consumer.next().await {
                    Ok(delivery) => delivery,
                    Err(Error::Closed) => return Ok(()),
                    Err(err) => return Err(err),
                };
                delivery.ack().await?;
                if remaining.fetch_sub(1, std::sync::atomic::Ordering::Relaxed) == 1 {
                    // The last message: stop the members still waiting.
                    closer.close();
                }
            }
        });
    }
    let start = Instant::now();
    let publisher = {
        let queue = queue.clone();
        tokio::spawn(async move {
            for i in 0..count {
                queue
                    .publish("bench.tasks", Message::new(payload.clone()))
                    .await?;
                if i % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            Ok::<_, Error>(())
        })
    };
    publisher
        .await
        .map_err(|e| Error::Backend(e.to_string()))??;
    while let Some(joined) = consumers.join_next().await {
        joined.map_err(|e| Error::Backend(e.to_string()))??;
    }
    report("tasks, 1 publisher, 4 consumers", count, start.elapsed());
    Ok(())
}

fn report(scenario: &str, count: usize, elapsed: Duration) {
    let rate = count as f64 / elapsed.as_secs_f64();
    println!("{scenario:<34} {count} messages in {elapsed:>10.3?}: {rate:>12.0} messages/s");
}
