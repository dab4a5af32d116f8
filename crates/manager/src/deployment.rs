//! One running deployment: for each service a synced source, a supervised process and a
//! worker.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deployd_config::SourceKind;
use deployd_config::{DeploymentSpec, ServiceSpec};
use deployd_queue::{MessageQueue, SubscribeOptions};
use deployd_sources::{GitSource, LocalSource, SourceManager, SyncPolicy, SyncRequest};
use tokio::sync::watch;

use crate::control::Control;
use crate::orphans::NODE_VAR;
use crate::prepare::{self, BuildMarks};
use crate::supervisor::{self, Policy, ProcessSpec, Supervisor};
use crate::worker::{self, WorkerContext};
use crate::{DeploymentStatus, Error, task_topic};

/// Tasks a service is handed at once when its `max-concurrency` is not set.
const UNLIMITED_CONCURRENCY: usize = 4096;

/// Everything a deployment needs to start.
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
    pub(crate) node_id: String,
    pub(crate) control: Arc<Control>,
    pub(crate) queue: Arc<dyn MessageQueue>,
    pub(crate) stop_timeout: Duration,
}

struct RunningService {
    supervisor: Supervisor,
    worker_stop: watch::Sender<bool>,
    worker: tokio::task::JoinHandle<()>,
}

/// Orders deployments by start, so that they stop in reverse.
static STARTS: AtomicU64 = AtomicU64::new(0);

pub(crate) struct Deployment {
    started: u64,
    spec: DeploymentSpec,
    text: String,
    base: PathBuf,
    dir: PathBuf,
    services: Vec<RunningService>,
    stopped: tokio::sync::Mutex<bool>,
}

impl Deployment {
    pub(crate) async fn start(context: Context) -> Result<Self, Error> {
        let dirs = ["src", "logs", "data"].map(|d| context.dir.join(d));
        for dir in &dirs {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|err| Error::io("cannot create", dir, err))?;
        }
        let [_, log_dir, data_dir] = dirs;

        // Sync every source before starting anything, so a bad source starts nothing.
        let workdirs = sync_sources(&context).await?;

        let mut deployment = Self {
            started: STARTS.fetch_add(1, Ordering::Relaxed),
            spec: context.spec.clone(),
            text: context.text.clone(),
            base: context.base.clone(),
            dir: context.dir.clone(),
            services: Vec::with_capacity(workdirs.len()),
            stopped: tokio::sync::Mutex::new(false),
        };
        for (service, workdir) in context.spec.services.iter().zip(workdirs) {
            match start_service(&context, service, workdir, &log_dir, &data_dir).await {
                Ok(running) => deployment.services.push(running),
                Err(err) => {
                    deployment.stop().await;
                    return Err(err);
                }
            }
        }
        Ok(deployment)
    }

    /// The order in which this deployment started among all.
    pub(crate) fn started(&self) -> u64 {
        self.started
    }

    pub(crate) fn spec(&self) -> &DeploymentSpec {
        &self.spec
    }

    /// Whether deploying `text` from `base` would change nothing.
    pub(crate) fn is_same(&self, text: &str, base: &Path) -> bool {
        self.text == text && self.base == base
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn status(&self) -> DeploymentStatus {
        DeploymentStatus {
            name: self.spec.name.clone(),
            default_service: self.spec.default_service.clone(),
            services: self
                .services
                .iter()
                .map(|s| s.supervisor.status())
                .collect(),
        }
    }

    /// Stops the workers, then the processes, in reverse order of start. Idempotent.
    pub(crate) async fn stop(&self) {
        let mut stopped = self.stopped.lock().await;
        if *stopped {
            return;
        }
        *stopped = true;
        for service in &self.services {
            let _ = service.worker_stop.send(true);
        }
        // Signalled in reverse order of start, waited for together: one stop timeout bounds
        // the whole deployment's stop.
        futures::future::join_all(self.services.iter().rev().map(|s| s.supervisor.stop())).await;
        for service in &self.services {
            service.worker.abort();
        }
    }
}

/// Syncs every service's source (or, when `context.sync` is false, keeps what is there) and
/// returns their folders. A failed sync leaves every tree as it was.
pub(crate) async fn sync_sources(context: &Context) -> Result<Vec<PathBuf>, Error> {
    let src_dir = context.dir.join("src");
    tokio::fs::create_dir_all(&src_dir)
        .await
        .map_err(|err| Error::io("cannot create", &src_dir, err))?;
    let mut workdirs = Vec::with_capacity(context.spec.services.len());
    for service in &context.spec.services {
        let workdir = src_dir.join(&service.id);
        sync_source(context, service, &workdir).await?;
        workdirs.push(workdir);
    }
    Ok(workdirs)
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
    let request = SyncRequest::new(&source.location, &context.base, workdir)
        .with_reference(source.reference.clone())
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
    BuildMarks::new(&context.dir, &service.id).record_sync(&synced.digest.to_string())
}

fn sync_policy(policy: deployd_config::SyncPolicy) -> SyncPolicy {
    match policy {
        deployd_config::SyncPolicy::Merge => SyncPolicy::Merge,
        deployd_config::SyncPolicy::Skip => SyncPolicy::Skip,
        deployd_config::SyncPolicy::Fail => SyncPolicy::Fail,
        _ => SyncPolicy::Replace,
    }
}

async fn start_service(
    context: &Context,
    service: &ServiceSpec,
    workdir: PathBuf,
    log_dir: &Path,
    data_dir: &Path,
) -> Result<RunningService, Error> {
    let Some(command) = service.command.clone() else {
        return Err(Error::BadRequest(format!(
            "service `{}` has no `command`",
            service.id
        )));
    };
    let service_data = data_dir.join(&service.id);
    tokio::fs::create_dir_all(&service_data)
        .await
        .map_err(|err| Error::io("cannot create", &service_data, err))?;
    let port = match service.port {
        Some(port) => port,
        None => free_port()
            .map_err(|err| Error::io("cannot allocate a port", workdir.as_path(), err))?,
    };
    // Later entries win: defaults, `env`, `env-files`, then what deployd sets.
    let mut env: Vec<(String, String)> = vec![("PYTHONUNBUFFERED".into(), "1".into())];
    env.extend(service.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(prepare::env_files(&context.base, &service.env_files)?);
    env.extend([
        ("PORT".into(), port.to_string()),
        ("HOST".into(), "127.0.0.1".into()),
        ("DEPLOYD_DEPLOYMENT".into(), context.spec.name.clone()),
        ("DEPLOYD_SERVICE".into(), service.id.clone()),
        (
            "DEPLOYD_DATA_DIR".into(),
            service_data.to_string_lossy().into_owned(),
        ),
        (NODE_VAR.into(), context.node_id.clone()),
    ]);
    let env = supervisor::process_env(env);

    let marks = BuildMarks::new(&context.dir, &service.id);
    let built = prepare::build(prepare::Build {
        service,
        workdir: &workdir,
        env: &env,
        log: &log_dir.join(format!("{}.build.log", service.id)),
        marks: &marks,
    })
    .await?;
    if built {
        tracing::info!(service = %service.id, "build finished");
    }

    let spec = ProcessSpec {
        service: service.id.clone(),
        command,
        workdir,
        env,
        port,
        log: log_dir.join(format!("{}.log", service.id)),
    };
    let topic = task_topic(&context.spec.name, &service.id);
    let ack_deadline = service.timeout.map_or(Duration::from_secs(24 * 3600), |t| {
        t + Duration::from_secs(60)
    });
    let consumer = context
        .queue
        .subscribe(
            &topic,
            "workers",
            SubscribeOptions::default().ack_deadline(ack_deadline),
        )
        .await?;
    let supervisor = Supervisor::start(spec, Policy::of(service, context.stop_timeout));
    let (worker_stop, stop_rx) = watch::channel(false);
    let worker = tokio::spawn(worker::run(
        WorkerContext {
            service: service.id.clone(),
            control: Arc::clone(&context.control),
            service_state: supervisor.watch(),
            max_concurrency: service
                .max_concurrency
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(UNLIMITED_CONCURRENCY),
            timeout: service.timeout,
        },
        consumer,
        stop_rx,
    ));
    Ok(RunningService {
        supervisor,
        worker_stop,
        worker,
    })
}

/// A port free on 127.0.0.1 right now.
fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}
