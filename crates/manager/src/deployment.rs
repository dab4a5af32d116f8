//! One deployment: for each service a slot holding its running instance, and the deploy
//! pipeline that brings new instances in.
//!
//! A deploy runs one item per service through the pipeline sync → prepare → launch → ready →
//! switch (`deployd-pipeline`). `sync` is fail-fast: if any source cannot be synced, the deploy
//! fails and nothing is switched. After it, a service's failure (a build that fails, a process
//! that never gets healthy) fails that service only: the others still deploy, and the failed
//! one keeps its previous instance, if it had one. `switch` starts the new instance's worker
//! and then stops the previous instance, so a reload routes tasks to the old instance until the
//! new one is ready.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deployd_config::{DeploymentSpec, ServiceSpec, SourceKind};
use deployd_pipeline::{Concurrency, ItemState, Pipeline, Progress};
use deployd_queue::{Consumer, MessageQueue, QueueConfig, SubscribeOptions};
use deployd_sources::{GitSource, LocalSource, SourceManager, SyncPolicy, SyncRequest};
use tokio::sync::watch;

use crate::control::Control;
use crate::orphans::NODE_VAR;
use crate::prepare::{self, BuildMarks};
use crate::queues::task_topic;
use crate::runtime::{self, Prepare, Prepared};
use crate::supervisor::{self, Policy, Supervisor};
use crate::worker::{self, WorkerContext};
use crate::{DeploymentStatus, Error, Phase, ReplicaStatus, ServiceStatus, StageStatus, UI_ID};

/// Tasks one instance of a service is handed at once when its `max-concurrency` is not set:
/// enough for an asyncio or threaded service, few enough not to flood a small one.
pub(crate) const DEFAULT_CONCURRENCY: usize = 32;

/// How many services each stage works on at once. Every stage passes services on in the order
/// they finish, so a slow build holds back no other service.
const SYNC_CONCURRENCY: usize = 4;
const PREPARE_CONCURRENCY: usize = 2;
const LAUNCH_CONCURRENCY: usize = 4;
const READY_CONCURRENCY: usize = 16;
const SWITCH_CONCURRENCY: usize = 1;

/// Everything a deploy needs.
pub(crate) struct Context {
    pub(crate) spec: DeploymentSpec,
    /// The deployment file's text, as deployed.
    pub(crate) text: String,
    /// The folder local sources are relative to.
    pub(crate) base: PathBuf,
    /// The deployment's own folder under the data directory.
    pub(crate) dir: PathBuf,
    /// Sync the sources (a deploy) or reuse the synced copies when present (a restore).
    pub(crate) sync: bool,
    /// Commits git sources are synced at instead of their file's `branch`/`tag` (a
    /// rollback), by service id.
    pub(crate) pins: std::collections::BTreeMap<String, String>,
    pub(crate) node_id: String,
    /// What the topics of the deployment's services are named after: the cluster, or the node
    /// alone (see `queues::task_topic`).
    pub(crate) topic_scope: String,
    /// In a cluster, the longest a delivery is held before the broker gives it to another
    /// node (see `sync_stage`).
    pub(crate) cluster_ack_deadline: Option<Duration>,
    /// `DEPLOYD_GRAPH_STORE` of every service, when the operator gave one.
    pub(crate) graph_store: Option<String>,
    pub(crate) control: Arc<Control>,
    /// The queue the deployment file names, and a connection to it.
    pub(crate) queue_config: QueueConfig,
    pub(crate) queue: Arc<dyn MessageQueue>,
    pub(crate) stop_timeout: Duration,
    /// How long a service may take to start answering a task.
    pub(crate) head_timeout: Duration,
    /// How long tasks in flight may take to finish when an instance stops.
    pub(crate) drain_timeout: Duration,
    /// The size at which a service's log file is rotated.
    pub(crate) log_max_bytes: u64,
    /// What the runtimes share.
    pub(crate) runtime: runtime::Settings,
}

/// One process of a service's instance and the worker that hands it tasks.
struct Replica {
    supervisor: Supervisor,
    worker_stop: watch::Sender<bool>,
    worker: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// A service's instance that takes tasks: its replicas (one unless `replicas` says more).
struct Instance {
    replicas: Vec<Replica>,
    /// What the instance runs (see [`Item::fingerprint`]): a reload that would run the same
    /// keeps it.
    fingerprint: String,
}

impl Instance {
    /// Stops every replica at once.
    async fn stop(&self) {
        futures::future::join_all(self.replicas.iter().map(Replica::stop)).await;
    }

    /// The port of the first replica (a service with a fixed `port` has one replica).
    fn port(&self) -> u16 {
        self.replicas
            .first()
            .map_or(0, |replica| replica.supervisor.status().port)
    }

    /// The instance's state: the first replica's, `ready` while any replica is, its restarts
    /// added up, and with several replicas each one's.
    fn status(&self) -> ServiceStatus {
        let statuses: Vec<ServiceStatus> = self
            .replicas
            .iter()
            .map(|replica| replica.supervisor.status())
            .collect();
        let mut status = statuses
            .first()
            .cloned()
            .unwrap_or_else(|| ServiceStatus::pending(""));
        if statuses.len() > 1 {
            if statuses.iter().any(|s| s.phase == Phase::Ready) {
                status.phase = Phase::Ready;
            }
            status.restarts = statuses.iter().map(|s| s.restarts).sum();
            status.replicas = statuses
                .into_iter()
                .map(|s| ReplicaStatus {
                    phase: s.phase,
                    pid: s.pid,
                    port: s.port,
                    restarts: s.restarts,
                    last_exit: s.last_exit,
                })
                .collect();
        }
        status
    }
}

impl Replica {
    /// Stops taking tasks, lets the tasks in flight finish (the worker bounds that by its
    /// drain deadline), then stops the process.
    async fn stop(&self) {
        let _ = self.worker_stop.send(true);
        let worker = self
            .worker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(worker) = worker
            && let Err(err) = worker.await
        {
            tracing::error!(error = %err, "worker task failed");
        }
        self.supervisor.stop().await;
    }
}

/// Orders deployments by start, so that they stop in reverse.
static STARTS: AtomicU64 = AtomicU64::new(0);

struct State {
    spec: DeploymentSpec,
    text: String,
    base: PathBuf,
    /// Running instances by service id, in the order they were switched in.
    instances: Vec<(String, Arc<Instance>)>,
    /// The progress of the latest deploy.
    progress: Option<Progress>,
    /// Whether a deploy is under way.
    deploying: bool,
    /// The latest deploy's task.
    pipeline: Option<tokio::task::JoinHandle<()>>,
    stopped: bool,
    /// The queue tasks are published to: the latest synced spec's.
    queue_config: QueueConfig,
    queue: Arc<dyn MessageQueue>,
}

pub(crate) struct Deployment {
    started: u64,
    name: String,
    dir: PathBuf,
    state: Mutex<State>,
    /// The state of each service's instance launched by the deploy under way, until it is
    /// switched in: a service that crash-loops before its first switch shows its restarts
    /// and exit reason, not `pending`.
    launching: Mutex<std::collections::HashMap<String, watch::Receiver<ServiceStatus>>>,
}

/// Which finished first in [`Deployment::deploy`]: the sync of every source, or the pipeline.
enum EndedFirst<T> {
    /// Every source was synced.
    No,
    /// The pipeline ended first; its outcome is still to be read.
    Yes,
    /// The pipeline ended first, with this outcome.
    With(T),
}

/// A deploy whose sources are synced and whose other stages go on in the background.
pub(crate) struct Deploying {
    ended: tokio::sync::oneshot::Receiver<()>,
}

impl Deploying {
    /// Waits until every service of the deploy has been switched in or has failed; returns
    /// the first failure (the service keeps its previous instance, if it had one).
    pub(crate) async fn finished(self, deployment: &Deployment) -> Result<(), Error> {
        // A deploy replaced by a newer one ends without telling: that one is waited for then.
        let _ = self.ended.await;
        match deployment
            .status()
            .services
            .into_iter()
            .find_map(|service| {
                let stage = service.stage?;
                (stage.state == "failed").then_some((service.id, stage))
            }) {
            Some((service, stage)) => Err(Error::NotReady {
                service,
                reason: format!(
                    "stage {} failed: {}",
                    stage.stage,
                    stage.error.unwrap_or_default()
                ),
            }),
            None => Ok(()),
        }
    }
}

/// One service going through the pipeline.
struct Item {
    service: ServiceSpec,
    workdir: PathBuf,
    consumer: Option<Box<dyn Consumer>>,
    prepared: Option<Prepared>,
    /// The port of the instance this deploy replaces (0 when none), then the new one's.
    port: u16,
    /// The service's log file.
    log: PathBuf,
    supervisor: Option<Supervisor>,
    /// The replicas after the first (`replicas: N` makes N - 1 of them).
    more: Vec<MoreReplica>,
    /// A digest of everything the service's processes are made of: its settings in the file,
    /// the tree its sync produced, and its environment (env files included) but the port.
    fingerprint: String,
    /// Whether the running instance already runs exactly this (same fingerprint): a reload
    /// then leaves it untouched.
    kept: bool,
}

/// A replica after the first, going through the pipeline with its service.
struct MoreReplica {
    consumer: Option<Box<dyn Consumer>>,
    port: u16,
    log: PathBuf,
    supervisor: Option<Supervisor>,
}

/// The log file of a service's replica: `<service>.log` for the first, `<service>.<n>.log`
/// for replica `n` after it.
pub(crate) fn log_name(service: &str, replica: usize) -> String {
    if replica == 0 {
        format!("{service}.log")
    } else {
        format!("{service}.{replica}.log")
    }
}

impl Deployment {
    /// A deployment with no instance yet; [`Deployment::deploy`] brings them in.
    pub(crate) fn new(context: &Context) -> Arc<Self> {
        Arc::new(Self {
            started: STARTS.fetch_add(1, Ordering::Relaxed),
            name: context.spec.name.clone(),
            dir: context.dir.clone(),
            state: Mutex::new(State {
                spec: context.spec.clone(),
                text: context.text.clone(),
                base: context.base.clone(),
                instances: Vec::new(),
                progress: None,
                deploying: false,
                pipeline: None,
                stopped: false,
                queue_config: context.queue_config.clone(),
                queue: Arc::clone(&context.queue),
            }),
            launching: Mutex::default(),
        })
    }

    fn launching(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, watch::Receiver<ServiceStatus>>>
    {
        self.launching
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs the deploy pipeline for `context` (a new spec, or the same one on restore).
    ///
    /// Returns once every service's source is synced and its task topic subscribed (so tasks
    /// can be created for every service of the new spec); the rest of the pipeline goes on in
    /// the background, visible in [`Deployment::status`]. A sync that fails fails the deploy
    /// and changes nothing that runs.
    pub(crate) async fn deploy(self: &Arc<Self>, context: Context) -> Result<Deploying, Error> {
        for dir in ["src", "logs", "data"].map(|d| context.dir.join(d)) {
            tokio::fs::create_dir_all(&dir)
                .await
                .map_err(|err| Error::io("cannot create", &dir, err))?;
        }
        let context = Arc::new(context);
        let total = context.spec.services.len() + usize::from(context.spec.ui.is_some());
        let (synced_tx, mut synced) = watch::channel(0usize);
        // The ports the running instances hold: a new instance may take its old one's port.
        let held: Vec<(String, u16)> = {
            let state = self.state();
            state
                .instances
                .iter()
                .map(|(id, instance)| (id.clone(), instance.port()))
                .collect()
        };
        let ui = context
            .spec
            .ui
            .as_ref()
            .map(|ui| ui_service(&context.spec.name, ui));
        let items: Vec<Item> = context
            .spec
            .services
            .iter()
            .chain(ui.iter())
            .map(|service| Item {
                workdir: context.dir.join("src").join(&service.id),
                service: service.clone(),
                consumer: None,
                prepared: None,
                port: held
                    .iter()
                    .find(|(id, _)| *id == service.id)
                    .map_or(0, |(_, port)| *port),
                log: context.dir.join("logs").join(log_name(&service.id, 0)),
                supervisor: None,
                more: (1..usize::try_from(service.replicas).unwrap_or(1))
                    .map(|n| MoreReplica {
                        consumer: None,
                        port: 0,
                        log: context.dir.join("logs").join(log_name(&service.id, n)),
                        supervisor: None,
                    })
                    .collect(),
                fingerprint: String::new(),
                kept: false,
            })
            .collect();

        let pipeline = {
            let sync_context = Arc::clone(&context);
            let prepare_context = Arc::clone(&context);
            let launch_context = Arc::clone(&context);
            let switch_context = Arc::clone(&context);
            let deployment = Arc::clone(self);
            Pipeline::from_iter(items)
                .track(|item: &Item| item.service.id.clone())
                .stage(
                    "sync",
                    Concurrency::unordered(SYNC_CONCURRENCY),
                    move |item| {
                        let context = Arc::clone(&sync_context);
                        let synced = synced_tx.clone();
                        async move {
                            let item = sync_stage(&context, item).await?;
                            synced.send_modify(|n| *n += 1);
                            Ok::<_, Error>(item)
                        }
                    },
                )
                .try_stage(
                    "prepare",
                    Concurrency::unordered(PREPARE_CONCURRENCY),
                    move |item| prepare_stage(Arc::clone(&prepare_context), item),
                )
                .and_then("launch", Concurrency::unordered(LAUNCH_CONCURRENCY), {
                    let deployment = Arc::clone(self);
                    move |item| {
                        let deployment = Arc::clone(&deployment);
                        let context = Arc::clone(&launch_context);
                        async move {
                            // A service whose instance runs exactly this stays as it is.
                            let mut item = item;
                            item.kept = deployment.runs(&item.service.id, &item.fingerprint);
                            if item.kept {
                                return Ok::<_, Error>(item);
                            }
                            // The UI's port is its file's: the running UI leaves it first (as
                            // llama_deploy stops its UI before starting the new one).
                            if item.service.id == UI_ID {
                                deployment.stop_instance(UI_ID).await;
                            }
                            let item = launch_stage(context, item).await?;
                            if let Some(supervisor) = &item.supervisor {
                                deployment
                                    .launching()
                                    .insert(item.service.id.clone(), supervisor.watch());
                            }
                            Ok::<_, Error>(item)
                        }
                    }
                })
                .and_then(
                    "ready",
                    Concurrency::unordered(READY_CONCURRENCY),
                    ready_stage,
                )
                .and_then(
                    "switch",
                    Concurrency::unordered(SWITCH_CONCURRENCY),
                    move |item| {
                        let context = Arc::clone(&switch_context);
                        let deployment = Arc::clone(&deployment);
                        async move { deployment.switch(&context, item).await }
                    },
                )
        };
        {
            let mut state = self.state();
            if state.stopped {
                return Err(Error::ShuttingDown);
            }
            if let Some(previous) = state.pipeline.take() {
                previous.abort();
            }
            state.progress = Some(pipeline.progress());
            state.deploying = true;
        }
        let deployment = Arc::clone(self);
        let new_spec = context.spec.clone();
        let scope = context.topic_scope.clone();
        let (ended_tx, ended) = tokio::sync::oneshot::channel();
        let mut run = tokio::spawn(async move {
            let outcome = pipeline.collect().await;
            deployment.finish(&new_spec, &scope, outcome.is_ok()).await;
            let _ = ended_tx.send(());
            outcome
        });

        // `Some(outcome)` when the pipeline ended first: a JoinHandle is awaited only once.
        let ended_first = tokio::select! {
            all = synced.wait_for(|n| *n == total) => if all.is_ok() {
                EndedFirst::No
            } else {
                EndedFirst::Yes
            },
            outcome = &mut run => EndedFirst::With(outcome),
        };
        let ended_first = match ended_first {
            // The pipeline ended (its sender went with it): wait for its outcome.
            EndedFirst::Yes => Some((&mut run).await),
            EndedFirst::No => None,
            EndedFirst::With(outcome) => Some(outcome),
        };
        if ended_first.is_none() {
            let mut state = self.state();
            state.spec = context.spec.clone();
            state.text = context.text.clone();
            state.base = context.base.clone();
            state.queue_config = context.queue_config.clone();
            state.queue = Arc::clone(&context.queue);
            state.pipeline = Some(tokio::spawn(async move {
                let _ = run.await;
            }));
            return Ok(Deploying { ended });
        }
        // The pipeline ended before every source was synced: its error says why.
        match ended_first.unwrap_or(Ok(Ok(Vec::new()))) {
            Ok(Ok(_)) => Ok(Deploying { ended }),
            Ok(Err(err)) => Err(pipeline_error(err)),
            Err(join) => Err(Error::BadRequest(format!(
                "the deploy was interrupted: {join}"
            ))),
        }
    }

    /// Brings a new instance in and stops the one it replaces; a kept one stays as it is (the
    /// consumers its deploy subscribed leave the group unused).
    async fn switch(&self, context: &Context, mut item: Item) -> Result<(), Error> {
        if item.kept {
            tracing::info!(service = %item.service.id, "unchanged; its instance keeps running");
            return Ok(());
        }
        let Some(supervisor) = item.supervisor.take() else {
            return Err(Error::BadRequest(format!(
                "service `{}` reached switch without a process",
                item.service.id
            )));
        };
        // The UI takes no tasks: its instance is its process alone.
        let Some(consumer) = item.consumer.take() else {
            let (worker_stop, _) = watch::channel(false);
            let instance = Arc::new(Instance {
                replicas: vec![Replica {
                    supervisor,
                    worker_stop,
                    worker: Mutex::new(None),
                }],
                fingerprint: std::mem::take(&mut item.fingerprint),
            });
            return self.swap_in(&item.service.id, instance).await;
        };
        let mut processes = vec![(supervisor, consumer)];
        for more in &mut item.more {
            let (Some(supervisor), Some(consumer)) = (more.supervisor.take(), more.consumer.take())
            else {
                return Err(Error::BadRequest(format!(
                    "a replica of service `{}` reached switch without a process",
                    item.service.id
                )));
            };
            processes.push((supervisor, consumer));
        }
        let replicas = processes
            .into_iter()
            .map(|(supervisor, consumer)| {
                start_worker(context, &item.service, supervisor, consumer)
            })
            .collect();
        let fingerprint = std::mem::take(&mut item.fingerprint);
        self.swap_in(
            &item.service.id,
            Arc::new(Instance {
                replicas,
                fingerprint,
            }),
        )
        .await
    }

    /// Puts `instance` in the place of service `id`'s running one, which is stopped.
    async fn swap_in(&self, id: &str, instance: Arc<Instance>) -> Result<(), Error> {
        // `Err(instance)`: the deployment was stopped meanwhile; the new instance goes too.
        let switched = {
            let mut state = self.state();
            if state.stopped {
                Err(instance)
            } else {
                let previous = state
                    .instances
                    .iter()
                    .position(|(held, _)| held == id)
                    .map(|index| state.instances.remove(index).1);
                state.instances.push((id.to_owned(), instance));
                self.launching().remove(id);
                Ok(previous)
            }
        };
        match switched {
            Ok(previous) => {
                if let Some(previous) = previous {
                    previous.stop().await;
                }
                Ok(())
            }
            Err(instance) => {
                instance.stop().await;
                Err(Error::ShuttingDown)
            }
        }
    }

    /// Whether service `id`'s running instance runs what `fingerprint` says, and has not
    /// failed.
    fn runs(&self, id: &str, fingerprint: &str) -> bool {
        let state = self.state();
        state.instances.iter().any(|(held, instance)| {
            held == id
                && instance.fingerprint == fingerprint
                && instance.status().phase != crate::Phase::Failed
        })
    }

    /// Stops the running instance of `id`, if there is one.
    async fn stop_instance(&self, id: &str) {
        let instance = {
            let mut state = self.state();
            state
                .instances
                .iter()
                .position(|(held, _)| held == id)
                .map(|index| state.instances.remove(index).1)
        };
        if let Some(instance) = instance {
            instance.stop().await;
        }
    }

    /// After a deploy: instances of services the spec no longer has are stopped.
    /// Their topics are removed from the broker.
    async fn finish(&self, spec: &DeploymentSpec, scope: &str, completed: bool) {
        let removed: Vec<(String, Arc<Instance>)> = {
            let mut state = self.state();
            state.deploying = false;
            if !completed {
                return;
            }
            let (keep, removed): (Vec<_>, Vec<_>) = std::mem::take(&mut state.instances)
                .into_iter()
                .partition(|(id, _)| {
                    spec.service(id).is_some() || (id == UI_ID && spec.ui.is_some())
                });
            state.instances = keep;
            removed
        };
        let queue = self.queue();
        for (id, instance) in removed {
            instance.stop().await;
            if id == UI_ID {
                continue;
            }
            let topic = task_topic(scope, &self.name, &id);
            if let Err(err) = queue.delete_topic(&topic).await {
                tracing::warn!(deployment = %self.name, topic = %topic, error = %err, "cannot remove the topic of a removed service");
            }
        }
    }

    /// The order in which this deployment started among all.
    pub(crate) fn started(&self) -> u64 {
        self.started
    }

    /// The service a task for `requested` (or the default service) goes to, when a running
    /// instance of it has not failed: the common case of [`Deployment::status`], without
    /// building the whole status. `None` when the full status must decide.
    pub(crate) fn ready_service(&self, requested: Option<&str>) -> Option<String> {
        let state = self.state();
        let id = requested.unwrap_or(&state.spec.default_service);
        let (_, instance) = state.instances.iter().find(|(service, _)| service == id)?;
        // On the task path: each replica's phase, without building the whole state.
        instance
            .replicas
            .iter()
            .any(|replica| replica.supervisor.status().phase != Phase::Failed)
            .then(|| id.to_owned())
    }

    pub(crate) fn spec(&self) -> DeploymentSpec {
        self.state().spec.clone()
    }

    /// Whether deploying `text` from `base` would change nothing.
    pub(crate) fn is_same(&self, text: &str, base: &Path) -> bool {
        let state = self.state();
        state.text == text && state.base == base
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The queue new tasks are published to.
    pub(crate) fn queue(&self) -> Arc<dyn MessageQueue> {
        Arc::clone(&self.state().queue)
    }

    /// The configuration [`Deployment::queue`] was connected with.
    pub(crate) fn queue_config(&self) -> QueueConfig {
        self.state().queue_config.clone()
    }

    pub(crate) fn status(&self) -> DeploymentStatus {
        let state = self.state();
        let snapshot = state.progress.as_ref().map(Progress::snapshot);
        let service_status = |id: &str| {
            let stage = snapshot
                .as_ref()
                .and_then(|s| s.item(id))
                .map(|item| StageStatus {
                    stage: item.stage.clone(),
                    state: match &item.state {
                        ItemState::Waiting => "waiting",
                        ItemState::Running => "running",
                        ItemState::Done => "done",
                        ItemState::Failed { .. } => "failed",
                        _ => "unknown",
                    }
                    .to_owned(),
                    error: match &item.state {
                        ItemState::Failed { error } => Some(error.clone()),
                        _ => None,
                    },
                });
            let instance = state.instances.iter().find(|(held, _)| held == id);
            let launching = self.launching().get(id).map(|w| w.borrow().clone());
            let mut status = match (instance, launching) {
                (Some((_, instance)), _) => instance.status(),
                (None, Some(launching)) => launching,
                (None, None) => ServiceStatus::pending(id),
            };
            if instance.is_none()
                && let Some(StageStatus {
                    error: Some(error), ..
                }) = &stage
            {
                status.phase = Phase::Failed;
                status.last_exit = Some(error.clone());
            }
            status.stage = stage;
            status
        };
        let services = state
            .spec
            .services
            .iter()
            .map(|service| service_status(&service.id))
            .collect();
        let ui = state.spec.ui.as_ref().map(|_| service_status(UI_ID));
        DeploymentStatus {
            name: self.name.clone(),
            default_service: state.spec.default_service.clone(),
            deploying: state.deploying,
            message_queue: crate::queues::describe(&state.queue_config),
            services,
            ui,
        }
    }

    /// Stops the deploy under way, then every instance, in reverse order of start. Idempotent.
    pub(crate) async fn stop(&self) {
        let instances = {
            let mut state = self.state();
            state.stopped = true;
            if let Some(pipeline) = state.pipeline.take() {
                pipeline.abort();
            }
            std::mem::take(&mut state.instances)
        };
        // Signalled in reverse order of start, waited for together: one stop timeout bounds
        // the whole deployment's stop.
        futures::future::join_all(instances.iter().rev().map(|(_, i)| i.stop())).await;
    }
}

/// A replica's worker: it hands the tasks `consumer` receives to the process `supervisor`
/// keeps.
fn start_worker(
    context: &Context,
    service: &ServiceSpec,
    supervisor: Supervisor,
    consumer: Box<dyn Consumer>,
) -> Replica {
    let (worker_stop, stop_rx) = watch::channel(false);
    let worker = tokio::spawn(worker::run(
        WorkerContext {
            service: service.id.clone(),
            control: Arc::clone(&context.control),
            service_state: supervisor.watch(),
            max_concurrency: service
                .max_concurrency
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(DEFAULT_CONCURRENCY),
            timeout: service.timeout,
            head_timeout: context.head_timeout,
            drain_timeout: context.drain_timeout,
        },
        consumer,
        stop_rx,
    ));
    Replica {
        supervisor,
        worker_stop,
        worker: Mutex::new(Some(worker)),
    }
}

/// The error a failed pipeline carries: the Manager's own when a stage returned one.
fn pipeline_error(err: deployd_pipeline::Error) -> Error {
    match err {
        deployd_pipeline::Error::Stage { stage, source } => match source.downcast::<Error>() {
            Ok(err) => *err,
            Err(other) => Error::BadRequest(format!("stage `{stage}` failed: {other}")),
        },
        other => Error::BadRequest(other.to_string()),
    }
}

async fn sync_stage(context: &Context, mut item: Item) -> Result<Item, Error> {
    sync_source(context, &item.service, &item.workdir).await?;
    if item.service.id == UI_ID {
        return Ok(item);
    }
    // Alone, a delivery is held as long as its task may run; in a cluster, for a few leases
    // at most: a node that dies holding deliveries it had not marked running yet gives them
    // back then (a task that runs longer is delivered again meanwhile, and the node that gets
    // it acks it without running it: its owner is alive).
    let alone = item
        .service
        .timeout
        .map_or(Duration::from_secs(24 * 3600), |t| {
            t + Duration::from_secs(60)
        });
    let ack_deadline = context.cluster_ack_deadline.map_or(alone, |d| d.min(alone));
    let topic = task_topic(&context.topic_scope, &context.spec.name, &item.service.id);
    // Every replica's worker is a member of the one group: each task goes to one of them.
    let subscribe = || {
        context.queue.subscribe(
            &topic,
            "workers",
            SubscribeOptions::default().ack_deadline(ack_deadline),
        )
    };
    item.consumer = Some(subscribe().await?);
    for more in &mut item.more {
        more.consumer = Some(subscribe().await?);
    }
    Ok(item)
}

async fn prepare_stage(context: Arc<Context>, mut item: Item) -> Result<Item, Error> {
    let service = &item.service;
    let data = context.dir.join("data").join(&service.id);
    tokio::fs::create_dir_all(&data)
        .await
        .map_err(|err| Error::io("cannot create", &data, err))?;
    let port = match service.port {
        // A python service's port is deployd's to choose: llama_deploy 0.9 ignores `port`
        // (its e2e files give every service 8002).
        Some(port) if service.runtime != deployd_config::Runtime::Python => {
            // A port another process holds would make that process look like this service:
            // its health check would answer, and tasks would go to it. (`item.port` is the
            // port of the instance this deploy replaces, which may hold it.)
            if item.port != port && std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
                return Err(Error::NotReady {
                    service: service.id.clone(),
                    reason: format!(
                        "port {port} on 127.0.0.1 is in use (by another service or program); \
                         give the service another `port`, or none and deployd picks one"
                    ),
                });
            }
            port
        }
        _ => free_port().map_err(|err| Error::io("cannot allocate a port", &data, err))?,
    };
    // Later entries win: defaults, `env`, `env-files`, then what deployd sets.
    let mut env: Vec<(String, String)> = vec![("PYTHONUNBUFFERED".into(), "1".into())];
    env.extend(service.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    // Env files are the deployment's: next to its file for a local source, in the checkout
    // (the deployment's root, as llama_deploy clones it) for a git source.
    let env_root = match &service.source {
        Some(source) if source.kind == SourceKind::Git => item.workdir.as_path(),
        _ => context.base.as_path(),
    };
    env.extend(prepare::env_files(env_root, &service.env_files)?);
    env.extend([
        ("PORT".into(), port.to_string()),
        ("HOST".into(), "127.0.0.1".into()),
        ("DEPLOYD_DEPLOYMENT".into(), context.spec.name.clone()),
        ("DEPLOYD_SERVICE".into(), service.id.clone()),
        (
            "DEPLOYD_DATA_DIR".into(),
            data.to_string_lossy().into_owned(),
        ),
        (NODE_VAR.into(), context.node_id.clone()),
    ]);
    if let Some(store) = &context.graph_store {
        env.push(("DEPLOYD_GRAPH_STORE".into(), store.clone()));
    }
    let env = supervisor::process_env(env);
    let marks = BuildMarks::new(&context.dir, &service.id);
    item.fingerprint = fingerprint(service, &marks, &env);
    let build_log = context
        .dir
        .join("logs")
        .join(format!("{}.build.log", service.id));
    let runtime = runtime::of(service, &context.runtime);
    tracing::debug!(service = %service.id, runtime = runtime.name(), "preparing");
    let prepared = runtime
        .prepare(Prepare {
            service,
            workdir: &item.workdir,
            env,
            deployment_dir: &context.dir,
            build_log: &build_log,
            marks: &marks,
        })
        .await?;
    item.prepared = Some(prepared);
    item.port = port;
    for more in &mut item.more {
        more.port = free_port().map_err(|err| Error::io("cannot allocate a port", &data, err))?;
    }
    Ok(item)
}

/// What [`Item::fingerprint`] holds: a SHA-256 of the service's settings, the digest of its
/// synced tree and its environment without `PORT`.
fn fingerprint(service: &ServiceSpec, marks: &BuildMarks, env: &[(String, String)]) -> String {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    hash.update(format!("{service:?}").as_bytes());
    hash.update(b"\0");
    hash.update(marks.synced().unwrap_or_default().as_bytes());
    for (key, value) in env.iter().filter(|(key, _)| key != "PORT") {
        hash.update(b"\0");
        hash.update(key.as_bytes());
        hash.update(b"=");
        hash.update(value.as_bytes());
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

async fn launch_stage(context: Arc<Context>, mut item: Item) -> Result<Item, Error> {
    if item.kept {
        return Ok(item);
    }
    let Some(prepared) = item.prepared.take() else {
        return Err(Error::BadRequest(format!(
            "service `{}` reached launch unprepared",
            item.service.id
        )));
    };
    let runtime = runtime::of(&item.service, &context.runtime);
    let policy = Policy::of(&item.service, context.stop_timeout, context.log_max_bytes);
    // Each replica after the first is the same process on its own port.
    for more in &mut item.more {
        let mut replica = prepared.clone();
        for (key, value) in &mut replica.env {
            if key == "PORT" {
                *value = more.port.to_string();
            }
        }
        more.supervisor = Some(runtime.launch(
            &item.service,
            replica,
            item.workdir.clone(),
            more.port,
            more.log.clone(),
            policy.clone(),
        ));
    }
    item.supervisor = Some(runtime.launch(
        &item.service,
        prepared,
        item.workdir.clone(),
        item.port,
        item.log.clone(),
        policy,
    ));
    Ok(item)
}

/// Waits until the new instance is healthy; a service that fails or never gets healthy fails
/// here and its process is stopped.
async fn ready_stage(mut item: Item) -> Result<Item, Error> {
    if item.kept {
        return Ok(item);
    }
    let Some(supervisor) = item.supervisor.as_ref() else {
        return Err(Error::BadRequest(format!(
            "service `{}` has no process",
            item.service.id
        )));
    };
    // Enough for the health timeout and a few restarts in between.
    let limit = item.service.health.timeout * 3 + Duration::from_secs(10);
    // Every replica must get ready; the first that does not fails the service.
    let mut waits = vec![(supervisor, item.log.as_path())];
    waits.extend(
        item.more
            .iter()
            .filter_map(|more| more.supervisor.as_ref().map(|s| (s, more.log.as_path()))),
    );
    let outcomes = futures::future::join_all(
        waits
            .iter()
            .map(|(supervisor, log)| async move { (wait_ready(supervisor, limit).await, *log) }),
    )
    .await;
    let failed = outcomes
        .into_iter()
        .find_map(|(outcome, log)| outcome.err().map(|reason| (reason, log.to_owned())));
    let Some((reason, log)) = failed else {
        return Ok(item);
    };
    let supervisors = item.supervisor.take().into_iter().chain(
        item.more
            .iter_mut()
            .filter_map(|more| more.supervisor.take()),
    );
    futures::future::join_all(supervisors.map(|supervisor| async move { supervisor.stop().await }))
        .await;
    // What the process said last says why (a Python traceback's last line, say).
    let said = log_tail(&log, LOG_LINES_SHOWN);
    let reason = if said.is_empty() {
        reason
    } else {
        format!("{reason}; its last output:\n{said}")
    };
    Err(Error::NotReady {
        service: item.service.id.clone(),
        reason,
    })
}

/// Waits until one process is healthy; why not, when it fails or never gets healthy within
/// `limit`.
async fn wait_ready(supervisor: &Supervisor, limit: Duration) -> Result<(), String> {
    let mut state = supervisor.watch();
    let reached = tokio::time::timeout(
        limit,
        state.wait_for(|s| {
            matches!(s.phase, Phase::Ready | Phase::Failed | Phase::Exited)
                || s.restarts >= CRASHES_BEFORE_READY
        }),
    )
    .await
    .map(|seen| seen.map(|status| status.clone()));
    match reached {
        Ok(Ok(status)) if status.phase == Phase::Ready => Ok(()),
        Ok(Ok(status)) if status.restarts >= CRASHES_BEFORE_READY => Err(format!(
            "it ended {} times before it was ever ready (last: {})",
            status.restarts,
            status.last_exit.as_deref().unwrap_or("no exit reason")
        )),
        Ok(Ok(status)) => Err(status
            .last_exit
            .unwrap_or_else(|| "the process ended".to_owned())),
        Ok(Err(_)) => Err("the supervisor ended".to_owned()),
        Err(_) => Err(format!("not ready after {limit:?}")),
    }
}

/// A new instance that ends this many times before it is ever ready fails its deploy: it is
/// not going to start (a missing module, a bad command).
const CRASHES_BEFORE_READY: u32 = 3;

/// How many lines of a service's log a failed deploy shows.
const LOG_LINES_SHOWN: usize = 10;

/// The last `lines` lines of the log at `path` (at most 4 KiB), without deployd's own
/// `--- deployd: ...` marks.
fn log_tail(path: &Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let length = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(length.saturating_sub(4096)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| !line.starts_with("--- deployd:") && !line.trim().is_empty())
        .collect();
    kept[kept.len().saturating_sub(lines)..].join("\n")
}

async fn sync_source(
    context: &Context,
    service: &ServiceSpec,
    workdir: &Path,
) -> Result<(), Error> {
    let Some(source) = &service.source else {
        return tokio::fs::create_dir_all(workdir)
            .await
            .map_err(|err| Error::io("cannot create", workdir, err));
    };
    if !context.sync && workdir.is_dir() {
        return Ok(());
    }
    let reference = match context.pins.get(&service.id) {
        Some(commit) if source.kind == SourceKind::Git => Some(commit.clone()),
        _ => source.reference.clone(),
    };
    let request = SyncRequest::new(&source.location, &context.base, workdir)
        .with_reference(reference)
        .with_policy(sync_policy(source.sync_policy))
        .within(&context.dir);
    let synced = match source.kind {
        SourceKind::Local => LocalSource::new().sync(&request).await,
        SourceKind::Git => GitSource::new().sync(&request).await,
        other => {
            return Err(Error::BadRequest(format!(
                "service `{}`: {other:?} sources are not supported",
                service.id
            )));
        }
    }
    .map_err(|source| Error::Source {
        service: service.id.clone(),
        source,
    })?;
    tracing::info!(
        service = %service.id,
        files = synced.files,
        bytes = synced.bytes,
        digest = %synced.digest,
        "source synced"
    );
    BuildMarks::new(&context.dir, &service.id).record_sync(
        &synced.digest.to_string(),
        synced.git.as_ref().map(|git| git.commit.as_str()),
    )
}

/// The command llama_deploy 0.9 installs a UI with, and the one it serves it with.
const UI_INSTALL: &str = "pnpm install";
const UI_SERVE: &str = "pnpm run dev";

/// How long a UI has to answer at its base path: a Next.js dev server compiles its first page
/// on that request.
const UI_READY_TIMEOUT: Duration = Duration::from_secs(180);

/// A deployment's `ui:` as the service deployd supervises for it (as llama_deploy 0.9 runs it:
/// `pnpm install`, then `pnpm run dev` with `PORT` and the Next.js base path set; `build` and
/// `command` replace those two). It is ready once `GET /deployments/<name>/ui` answers 2xx.
fn ui_service(deployment: &str, ui: &deployd_config::UiSpec) -> ServiceSpec {
    let base_path = format!("/deployments/{deployment}/ui");
    let mut health = deployd_config::HealthSpec::default();
    health.path.clone_from(&base_path);
    health.timeout = UI_READY_TIMEOUT;
    ServiceSpec {
        id: UI_ID.to_owned(),
        name: ui.name.clone(),
        source: ui.source.clone(),
        import_path: None,
        command: Some(
            ui.command
                .clone()
                .unwrap_or_else(|| deployd_config::Command::Shell(UI_SERVE.to_owned())),
        ),
        port: Some(ui.port),
        env: [
            ("LLAMA_DEPLOY_NEXTJS_BASE_PATH".to_owned(), base_path),
            (
                "LLAMA_DEPLOY_NEXTJS_DEPLOYMENT_NAME".to_owned(),
                deployment.to_owned(),
            ),
        ]
        .into(),
        runtime: deployd_config::Runtime::Process,
        build: if ui.build.is_empty() {
            vec![deployd_config::Command::Shell(UI_INSTALL.to_owned())]
        } else {
            ui.build.clone()
        },
        replicas: 1,
        health,
        restart: deployd_config::RestartSpec::default(),
        max_concurrency: None,
        timeout: None,
        env_files: Vec::new(),
        python_dependencies: Vec::new(),
    }
}

fn sync_policy(policy: deployd_config::SyncPolicy) -> SyncPolicy {
    match policy {
        deployd_config::SyncPolicy::Merge => SyncPolicy::Merge,
        deployd_config::SyncPolicy::Skip => SyncPolicy::Skip,
        deployd_config::SyncPolicy::Fail => SyncPolicy::Fail,
        _ => SyncPolicy::Replace,
    }
}

/// A port free on 127.0.0.1 right now.
fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}
