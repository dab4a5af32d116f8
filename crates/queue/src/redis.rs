//! The Redis Streams backend (feature `redis`).
//!
//! Layout, for topic `t`, group `g` and key prefix `p` (the braces make every key of a topic
//! hash to one cluster slot):
//! - `p:{t}`: the topic's stream. `publish` is one `XADD`; each group is a consumer group on
//!   it, created with `XGROUP CREATE ... $ MKSTREAM`, so it starts after its creation.
//! - `p:{t}:retry:g`: the group's own stream of redeliveries, with a consumer group of the
//!   same name. A redelivery must reach one group only, so it cannot go back on the shared
//!   stream.
//! - `p:{t}:delay:g`: a sorted set of messages nacked with a delay, scored by due time.
//!
//! A member reads both streams with one `XREADGROUP ... COUNT 1 BLOCK`, redeliveries first.
//! The fields of an entry are `id`, `attempt`, `payload` and `h:{name}` per header. An ack is
//! `XACK` (and `XDEL` on the retry stream). A nack, an expired ack deadline and a dropped
//! consumer all run one Lua script that acks the held entry and, only if it was still pending
//! (so a late ack or nack of a taken-back delivery changes nothing), copies it with
//! `attempt + 1` to the retry stream or into the delay set. Each member's ack deadline is part
//! of its consumer name (`{deadline_ms}.{uuid}`); waiting members run a maintenance script
//! every [`RedisOptions::poll_interval`] that takes back entries idle (`XPENDING`) past their
//! holder's deadline and moves due delayed messages to the retry stream, using the server's
//! clock. A dropped consumer hands back its entries at once and leaves the group.
//!
//! [`MessageQueue::delete_topic`] deletes the topic's stream `p:{t}` and every key under
//! `p:{t}:` (the groups' retry streams and delay sets), found with `SCAN ... MATCH` (the
//! pattern escapes the glob characters of the prefix), and so the consumer groups with their
//! pending entries and delayed messages. Its members in this process end with
//! [`Error::Closed`](crate::Error::Closed); members in other processes find their group gone
//! and create it again (empty, from the next message published) at their next read.
//!
//! Order: a single member receives a topic's messages in publish order; redeliveries come
//! before new messages. Acked entries of the topic stream stay in it (several groups read
//! it) unless [`RedisOptions::max_stream_length`] caps it.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError, Script, Value};
use tokio::time::Instant;

pub use crate::config::RedisOptions;
use crate::redact::Secrets;
use crate::removal::{Removal, Removals};
use crate::retry::{self, Reconnect};
use crate::{Acker, Consumer, Delivery, Error, Message, MessageQueue, SubscribeOptions};

/// Copies held entry ARGV[2] of stream KEYS[1] (group ARGV[1]) with `attempt + 1` to the retry
/// stream KEYS[2], or after ARGV[3] ms into the delay set KEYS[3]; only if it was pending.
/// ARGV[4] is `1` when KEYS[1] is the retry stream, whose entries are deleted once settled.
const REDELIVER: &str = r"
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if acked == 0 then return 0 end
local entries = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if ARGV[4] == '1' then redis.call('XDEL', KEYS[1], ARGV[2]) end
if #entries == 0 then return 0 end
local fields = entries[1][2]
for i = 1, #fields, 2 do
  if fields[i] == 'attempt' then fields[i + 1] = tostring(tonumber(fields[i + 1]) + 1) end
end
local delay = tonumber(ARGV[3])
if delay > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[3], now + delay, cmsgpack.pack(fields))
else
  redis.call('XADD', KEYS[2], '*', unpack(fields))
end
return 1
";

/// Maintenance of group ARGV[1]: moves due entries of the delay set KEYS[3] to the retry stream
/// KEYS[2], and takes back pending entries of KEYS[1] and KEYS[2] idle past the ack deadline
/// in their holder's name; ARGV[2] bounds the work. With ARGV[3] set, takes back every entry
/// consumer ARGV[3] holds instead, and removes it from the group once it holds nothing.
/// Returns how many entries it moved.
const MAINTAIN: &str = r"
local group, limit, only = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local moved = 0
local function copy(key, id, retry)
  redis.call('XACK', key, group, id)
  local entries = redis.call('XRANGE', key, id, id)
  if retry then redis.call('XDEL', key, id) end
  if #entries == 0 then return end
  local fields = entries[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'attempt' then fields[i + 1] = tostring(tonumber(fields[i + 1]) + 1) end
  end
  redis.call('XADD', KEYS[2], '*', unpack(fields))
  moved = moved + 1
end
if only == '' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, limit)
  for _, packed in ipairs(due) do
    redis.call('XADD', KEYS[2], '*', unpack(cmsgpack.unpack(packed)))
    redis.call('ZREM', KEYS[3], packed)
    moved = moved + 1
  end
end
for s = 1, 2 do
  local pending
  if only == '' then
    pending = redis.call('XPENDING', KEYS[s], group, '-', '+', limit)
  else
    pending = redis.call('XPENDING', KEYS[s], group, '-', '+', limit, only)
  end
  for _, entry in ipairs(pending) do
    local id, holder, idle = entry[1], entry[2], tonumber(entry[3])
    local deadline = tonumber(string.match(holder, '^(%d+)%.'))
    if only ~= '' or (deadline and idle >= deadline) then copy(KEYS[s], id, s == 2) end
  end
end
if only ~= '' and moved == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], group, only)
  redis.call('XGROUP', 'DELCONSUMER', KEYS[2], group, only)
end
return moved
";

/// How many entries one maintenance run handles at most.
const MAINTENANCE_BATCH: usize = 100;

/// A [`MessageQueue`] on Redis Streams. See the [module docs](self).
///
/// Cloning is cheap and yields another handle on the same connection.
#[derive(Clone)]
pub struct RedisQueue {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueue")
            .field("key_prefix", &self.shared.options.key_prefix)
            .finish_non_exhaustive()
    }
}

struct Shared {
    client: Client,
    options: RedisOptions,
    secrets: Secrets,
    /// The connection for everything but blocking reads; `None` after it broke.
    connection: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    redeliver: Script,
    maintain: Script,
    /// The topics this queue removed, for its members.
    removals: Removals,
}

impl RedisQueue {
    /// Connects to the server of `options.url`; fails with [`Error::InvalidConfig`] for a
    /// malformed URL before connecting, and with [`Error::Unavailable`] when the server does
    /// not answer within the connect timeout.
    pub async fn connect(options: RedisOptions) -> Result<Self, Error> {
        options.validate()?;
        let secrets = Secrets::of_url(&options.url);
        let client = Client::open(options.url.trim()).map_err(|err| {
            crate::address::invalid("Redis URL", &options.url, secrets.scrub(&err.to_string()))
        })?;
        let shared = Arc::new(Shared {
            client,
            options,
            secrets,
            connection: tokio::sync::Mutex::new(None),
            redeliver: Script::new(REDELIVER),
            maintain: Script::new(MAINTAIN),
            removals: Removals::default(),
        });
        let bounds = shared.options.bounds.clone();
        retry::bounded(
            &bounds,
            bounds.connect_timeout,
            "connecting to redis",
            || shared.connection(),
        )
        .await?;
        Ok(Self { shared })
    }

    fn keys(&self, topic: &str, group: &str) -> Keys {
        Keys {
            stream: self.shared.stream_key(topic),
            retry: format!("{}:retry:{group}", self.shared.stream_key(topic)),
            delay: format!("{}:delay:{group}", self.shared.stream_key(topic)),
            group: group.to_owned(),
        }
    }
}

impl Shared {
    /// The key of `topic`'s stream; its other keys start with it and `:`.
    fn stream_key(&self, topic: &str) -> String {
        format!("{}:{{{topic}}}", self.options.key_prefix)
    }

    fn connection_config(&self, response_timeout: Duration) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.options.bounds.connect_timeout))
            .set_response_timeout(Some(response_timeout))
    }

    /// The shared connection, connecting if there is none.
    async fn connection(&self) -> Result<MultiplexedConnection, Error> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let config = self.connection_config(self.options.bounds.publish_timeout);
        let connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|err| self.map_error(err))?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Forgets the shared connection after `err` if it means the connection broke.
    async fn check(&self, err: RedisError) -> Error {
        if is_connection_error(&err) {
            *self.connection.lock().await = None;
        }
        self.map_error(err)
    }

    /// `err` as this crate's error, with the secrets of the URL hidden.
    fn map_error(&self, err: RedisError) -> Error {
        self.secrets.scrub_error(map_error(err))
    }

    /// Runs `cmd` on the shared connection, reconnecting and retrying within the publish
    /// timeout.
    async fn run<T: redis::FromRedisValue>(
        &self,
        what: &str,
        cmd: impl Fn() -> redis::Cmd,
    ) -> Result<T, Error> {
        let bounds = &self.options.bounds;
        retry::bounded(bounds, bounds.publish_timeout, what, || async {
            let mut connection = self.connection().await?;
            match cmd().query_async(&mut connection).await {
                Ok(value) => Ok(value),
                Err(err) => Err(self.check(err).await),
            }
        })
        .await
    }

    /// Runs `pipe` on the shared connection, reconnecting and retrying within the publish
    /// timeout.
    async fn run_pipe(&self, what: &str, pipe: &redis::Pipeline) -> Result<(), Error> {
        let bounds = &self.options.bounds;
        retry::bounded(bounds, bounds.publish_timeout, what, || async {
            let mut connection = self.connection().await?;
            match pipe.query_async::<()>(&mut connection).await {
                Ok(()) => Ok(()),
                Err(err) => Err(self.check(err).await),
            }
        })
        .await
    }

    /// Runs `script` with the keys of `keys` and `args`, within the publish timeout.
    async fn run_script(
        &self,
        what: &str,
        script: &Script,
        keys: &Keys,
        args: &[&str],
    ) -> Result<i64, Error> {
        let bounds = &self.options.bounds;
        retry::bounded(bounds, bounds.publish_timeout, what, || async {
            let mut connection = self.connection().await?;
            let mut invocation = script.prepare_invoke();
            invocation
                .key(&keys.stream)
                .key(&keys.retry)
                .key(&keys.delay);
            for arg in args {
                invocation.arg(*arg);
            }
            match invocation.invoke_async(&mut connection).await {
                Ok(value) => Ok(value),
                Err(err) => Err(self.check(err).await),
            }
        })
        .await
    }

    /// Creates the group on both streams; an existing group is left as it is.
    async fn create_group(&self, keys: &Keys) -> Result<(), Error> {
        for (key, start) in [(&keys.stream, "$"), (&keys.retry, "0")] {
            let result: Result<Value, Error> = self
                .run("creating a consumer group", || {
                    let mut cmd = redis::cmd("XGROUP");
                    cmd.arg("CREATE")
                        .arg(key)
                        .arg(&keys.group)
                        .arg(start)
                        .arg("MKSTREAM");
                    cmd
                })
                .await;
            match result {
                Ok(_) => {}
                Err(Error::Backend(message)) if message.contains("BUSYGROUP") => {}
                Err(err) => return Err(err),
            }
            if let Some(expiry) = self.options.key_expiry {
                let ms = u64::try_from(expiry.as_millis()).unwrap_or(u64::MAX).max(1);
                let _: Value = self
                    .run("setting a key's expiry", || {
                        let mut cmd = redis::cmd("PEXPIRE");
                        cmd.arg(key).arg(ms);
                        cmd
                    })
                    .await?;
            }
        }
        Ok(())
    }

    /// Deletes `topic`'s stream and every key under it.
    async fn delete_topic(&self, topic: &str) -> Result<(), Error> {
        let stream = self.stream_key(topic);
        let pattern = format!("{}:*", escape_glob(&stream));
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = self
                .run("listing a topic's keys on redis", || {
                    let mut cmd = redis::cmd("SCAN");
                    cmd.arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000);
                    cmd
                })
                .await?;
            if !keys.is_empty() {
                let _: Value = self
                    .run("deleting a topic's keys on redis", || {
                        let mut cmd = redis::cmd("UNLINK");
                        cmd.arg(&keys);
                        cmd
                    })
                    .await?;
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let _: Value = self
            .run("deleting a topic's stream on redis", || {
                let mut cmd = redis::cmd("UNLINK");
                cmd.arg(&stream);
                cmd
            })
            .await?;
        Ok(())
    }

    /// Hands back every entry `consumer` holds and removes it from the group.
    async fn release(&self, keys: &Keys, consumer: &str) -> Result<(), Error> {
        let limit = MAINTENANCE_BATCH.to_string();
        loop {
            let moved = self
                .run_script(
                    "handing back a dropped consumer's messages",
                    &self.maintain,
                    keys,
                    &[&keys.group, &limit, consumer],
                )
                .await?;
            if moved == 0 {
                return Ok(());
            }
        }
    }
}

/// The keys of one group of one topic.
#[derive(Debug, Clone)]
struct Keys {
    stream: String,
    retry: String,
    delay: String,
    group: String,
}

/// `text` with the characters Redis's glob patterns give a meaning escaped.
fn escape_glob(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

fn is_connection_error(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
        || err.is_unrecoverable_error()
}

fn map_error(err: RedisError) -> Error {
    let transient = matches!(
        err.code(),
        Some("LOADING" | "TRYAGAIN" | "MASTERDOWN" | "CLUSTERDOWN")
    );
    if transient || is_connection_error(&err) {
        Error::Unavailable(format!("redis: {err}"))
    } else {
        Error::Backend(format!("redis: {err}"))
    }
}

#[async_trait]
impl MessageQueue for RedisQueue {
    async fn publish(&self, topic: &str, message: Message) -> Result<(), Error> {
        crate::validate_name("topic", topic)?;
        let key = format!("{}:{{{topic}}}", self.shared.options.key_prefix);
        let max_len = self.shared.options.max_stream_length;
        let attempt = message.attempt.to_string();
        let xadd = || {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&key);
            if let Some(max_len) = max_len {
                cmd.arg("MAXLEN").arg("~").arg(max_len);
            }
            cmd.arg("*")
                .arg("id")
                .arg(&message.id)
                .arg("attempt")
                .arg(&attempt)
                .arg("payload")
                .arg(message.payload.as_ref());
            for (name, value) in &message.headers {
                cmd.arg(format!("h:{name}")).arg(value);
            }
            cmd
        };
        match self.shared.options.key_expiry {
            None => {
                let _id: Value = self.shared.run("publishing to redis", xadd).await?;
            }
            Some(expiry) => {
                let mut pipe = redis::pipe();
                pipe.add_command(xadd()).ignore();
                pipe.cmd("PEXPIRE")
                    .arg(&key)
                    .arg(u64::try_from(expiry.as_millis()).unwrap_or(u64::MAX).max(1))
                    .ignore();
                self.shared.run_pipe("publishing to redis", &pipe).await?;
            }
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Consumer>, Error> {
        crate::validate_name("topic", topic)?;
        crate::validate_name("group", group)?;
        let keys = Arc::new(self.keys(topic, group));
        // Watched from before the group exists: a removal that comes after ends this member.
        let removal = self.shared.removals.watch(topic);
        self.shared.create_group(&keys).await?;
        let deadline_ms = u64::try_from(options.ack_deadline.as_millis()).unwrap_or(u64::MAX);
        let name = format!("{deadline_ms}.{}", uuid::Uuid::new_v4().simple());
        Ok(Box::new(RedisConsumer {
            reader: Arc::new(Reader {
                shared: Arc::clone(&self.shared),
                keys,
                name,
                removal,
                connection: tokio::sync::Mutex::new(None),
                last_maintenance: Mutex::new(None),
            }),
            buffer: VecDeque::new(),
            read: None,
        }))
    }

    async fn delete_topic(&self, topic: &str) -> Result<(), Error> {
        crate::validate_name("topic", topic)?;
        // First, so that no member of this process creates its group again meanwhile.
        self.shared.removals.remove(topic);
        self.shared.delete_topic(topic).await
    }
}

/// One member's reading side; shared with its read task.
struct Reader {
    shared: Arc<Shared>,
    keys: Arc<Keys>,
    name: String,
    /// Fires when this queue removes the member's topic.
    removal: Removal,
    /// The member's own connection for blocking reads.
    connection: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    last_maintenance: Mutex<Option<Instant>>,
}

/// An entry read from one of a group's streams.
struct Entry {
    retry: bool,
    id: String,
    message: Message,
}

impl Reader {
    /// One round: maintenance if due, then one blocking read of both streams.
    async fn read(self: Arc<Self>) -> Result<Vec<Entry>, Error> {
        if self.removal.is_removed() {
            return Err(Error::Closed);
        }
        let interval = self.shared.options.poll_interval;
        let due = {
            let mut last = self
                .last_maintenance
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let due = last.is_none_or(|at| at.elapsed() >= interval);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due {
            let limit = MAINTENANCE_BATCH.to_string();
            self.shared
                .run_script(
                    "redis maintenance",
                    &self.shared.maintain,
                    &self.keys,
                    &[&self.keys.group, &limit, ""],
                )
                .await?;
        }
        let mut slot = self.connection.lock().await;
        let mut connection = match slot.as_ref() {
            Some(connection) => connection.clone(),
            None => {
                let config = self
                    .shared
                    .connection_config(interval + self.shared.options.bounds.publish_timeout);
                let connection = self
                    .shared
                    .client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(|err| self.shared.map_error(err))?;
                *slot = Some(connection.clone());
                connection
            }
        };
        drop(slot);
        let block = u64::try_from(interval.as_millis()).unwrap_or(1000).max(1);
        let reply: Result<Value, RedisError> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.keys.group)
            .arg(&self.name)
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(block)
            .arg("STREAMS")
            .arg(&self.keys.retry)
            .arg(&self.keys.stream)
            .arg(">")
            .arg(">")
            .query_async(&mut connection)
            .await;
        match reply {
            Ok(value) => parse_read_reply(&self.keys, value),
            Err(err) => {
                if is_connection_error(&err) {
                    *self.connection.lock().await = None;
                }
                if err.code() == Some("NOGROUP") {
                    if self.removal.is_removed() {
                        // This queue removed the topic: do not bring the group back.
                        return Err(Error::Closed);
                    }
                    // The server lost the group (restarted without persistence, or another
                    // process removed the topic): recreate it.
                    self.shared.create_group(&self.keys).await?;
                    return Ok(Vec::new());
                }
                Err(self.shared.map_error(err))
            }
        }
    }
}

/// A read of a member's streams in progress.
type Reading = Pin<Box<dyn Future<Output = Result<Vec<Entry>, Error>> + Send>>;

/// A member of a group of a [`RedisQueue`].
struct RedisConsumer {
    reader: Arc<Reader>,
    /// Entries read but not yet handed out (a read returns up to one per stream).
    buffer: VecDeque<Entry>,
    /// The read in progress; it outlives a cancelled `next`, whose result the next call takes.
    read: Option<Reading>,
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn next(&mut self) -> Result<Delivery, Error> {
        let removal = self.reader.removal.clone();
        removal.or_closed(self.next_entry()).await
    }
}

impl RedisConsumer {
    /// `next` until the topic is removed; cancel safe.
    async fn next_entry(&mut self) -> Result<Delivery, Error> {
        let mut reconnect = Reconnect::new(&self.reader.shared.options.bounds);
        loop {
            if let Some(entry) = self.buffer.pop_front() {
                let acker = RedisAcker {
                    shared: Arc::clone(&self.reader.shared),
                    reader: Arc::clone(&self.reader),
                    keys: Arc::clone(&self.reader.keys),
                    retry: entry.retry,
                    id: entry.id,
                };
                return Ok(Delivery::new(entry.message, Box::new(acker)));
            }
            let read = self
                .read
                .get_or_insert_with(|| Box::pin(Arc::clone(&self.reader).read()));
            let result = read.await;
            self.read = None;
            match result {
                Ok(entries) => {
                    reconnect.succeeded();
                    self.buffer.extend(entries);
                }
                Err(Error::Unavailable(message)) => reconnect.pause("redis read", &message).await,
                Err(err) => return Err(err),
            }
        }
    }
}

impl Drop for RedisConsumer {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to hand back on: the ack deadline brings the entries back.
            return;
        };
        let read = self.read.take();
        let reader = Arc::clone(&self.reader);
        runtime.spawn(async move {
            // The read in progress may still take an entry in this member's name; wait for it
            // so that the hand-back sees it.
            if let Some(read) = read {
                let _ = read.await;
            }
            if reader.removal.is_removed() {
                // Its entries went with the topic.
                return;
            }
            let shared = &reader.shared;
            if let Err(err) = shared.release(&reader.keys, &reader.name).await {
                tracing::warn!(
                    group = %reader.keys.group,
                    error = %err,
                    "cannot hand back a dropped consumer's messages; its ack deadline will"
                );
            }
        });
    }
}

fn parse_read_reply(keys: &Keys, value: Value) -> Result<Vec<Entry>, Error> {
    let streams = match value {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|stream| match stream {
                Value::Array(mut pair) if pair.len() == 2 => {
                    let entries = pair.pop()?;
                    let key = pair.pop()?;
                    Some((key, entries))
                }
                _ => None,
            })
            .collect::<Vec<_>>(),
        Value::Map(streams) => streams,
        other => return Err(unexpected(&other)),
    };
    let mut out = Vec::new();
    // Redeliveries first, whatever order the server answered in.
    let mut streams: Vec<(bool, Value)> = streams
        .into_iter()
        .map(|(key, entries)| {
            (
                as_string(&key).as_deref() == Some(keys.retry.as_str()),
                entries,
            )
        })
        .collect();
    streams.sort_by_key(|(retry, _)| !*retry);
    for (retry, entries) in streams {
        let Value::Array(entries) = entries else {
            continue;
        };
        for entry in entries {
            let Value::Array(mut pair) = entry else {
                return Err(unexpected(&entry));
            };
            if pair.len() != 2 {
                return Err(Error::Backend("redis: malformed stream entry".to_owned()));
            }
            let fields = pair.pop().unwrap_or(Value::Nil);
            let id = as_string(&pair[0]).ok_or_else(|| unexpected(&pair[0]))?;
            let message = decode(fields)?;
            out.push(Entry { retry, id, message });
        }
    }
    Ok(out)
}

fn decode(fields: Value) -> Result<Message, Error> {
    let fields: Vec<(Value, Value)> = match fields {
        Value::Array(flat) => {
            let mut pairs = Vec::with_capacity(flat.len() / 2);
            let mut flat = flat.into_iter();
            while let (Some(name), Some(value)) = (flat.next(), flat.next()) {
                pairs.push((name, value));
            }
            pairs
        }
        Value::Map(pairs) => pairs,
        other => return Err(unexpected(&other)),
    };
    let mut id = None;
    let mut attempt = 1;
    let mut payload = Bytes::new();
    let mut headers = BTreeMap::new();
    for (name, value) in fields {
        let Some(name) = as_string(&name) else {
            continue;
        };
        match name.as_str() {
            "id" => id = as_string(&value),
            "attempt" => {
                attempt = as_string(&value).and_then(|a| a.parse().ok()).unwrap_or(1);
            }
            "payload" => {
                if let Value::BulkString(bytes) = value {
                    payload = Bytes::from(bytes);
                }
            }
            other => {
                if let Some(header) = other.strip_prefix("h:") {
                    headers.insert(header.to_owned(), as_string(&value).unwrap_or_default());
                }
            }
        }
    }
    let id = id.ok_or_else(|| Error::Backend("redis: a stream entry has no `id`".to_owned()))?;
    Ok(Message {
        id,
        attempt,
        headers,
        payload,
    })
}

fn as_string(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn unexpected(value: &Value) -> Error {
    Error::Backend(format!("redis: unexpected reply {value:?}"))
}

/// Settles one entry of a [`RedisQueue`].
struct RedisAcker {
    shared: Arc<Shared>,
    /// The member's reading connection, idle between its reads: acks go there, as a member
    /// of a raw client would send them.
    reader: Arc<Reader>,
    keys: Arc<Keys>,
    retry: bool,
    id: String,
}

impl RedisAcker {
    fn key(&self) -> &str {
        if self.retry {
            &self.keys.retry
        } else {
            &self.keys.stream
        }
    }

    /// Hands the entry back; nothing once the topic was removed (the entry went with it).
    async fn redeliver(&self, delay: Option<Duration>) -> Result<(), Error> {
        if self.reader.removal.is_removed() {
            return Ok(());
        }
        let delay_ms = delay.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let keys = Keys {
            stream: self.key().to_owned(),
            ..(*self.keys).clone()
        };
        let delay_ms = delay_ms.to_string();
        let retry = if self.retry { "1" } else { "0" };
        self.shared
            .run_script(
                "nacking a redis message",
                &self.shared.redeliver,
                &keys,
                &[&self.keys.group, &self.id, &delay_ms, retry],
            )
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Acker for RedisAcker {
    async fn ack(self: Box<Self>) -> Result<(), Error> {
        if self.reader.removal.is_removed() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("XACK")
            .arg(self.key())
            .arg(&self.keys.group)
            .arg(&self.id)
            .ignore();
        if self.retry {
            pipe.cmd("XDEL").arg(self.key()).arg(&self.id).ignore();
        }
        let idle = self.reader.connection.lock().await.clone();
        if let Some(mut connection) = idle {
            match pipe.query_async::<()>(&mut connection).await {
                Ok(()) => return Ok(()),
                Err(err) if is_connection_error(&err) => {
                    *self.reader.connection.lock().await = None;
                }
                Err(err) => return Err(self.shared.map_error(err)),
            }
        }
        self.shared.run_pipe("acking a redis message", &pipe).await
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<(), Error> {
        self.redeliver(delay).await
    }

    fn abandon(self: Box<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            if let Err(err) = self.redeliver(None).await {
                tracing::warn!(error = %err, "cannot hand back an abandoned redis delivery");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::escape_glob;

    fn check(text: &str, expected: &str) {
        assert_eq!(escape_glob(text), expected, "{text:?}");
    }

    #[test]
    fn glob_characters_are_escaped() {
        check("deployd:{a.b-c_d}", "deployd:{a.b-c_d}");
        check("p*?:{t}", "p\\*\\?:{t}");
        check("[x]\\", "\\[x\\]\\\\");
    }
}
