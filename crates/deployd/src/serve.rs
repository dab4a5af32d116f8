//! `deployd serve`: options → the Manager and the server → run → a signal → drain, with a
//! deadline.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use deployd_manager::{ClusterOptions, FileOrigin, Manager, Options, StoreLocation};
use deployd_server::ApiOptions;
use deployd_server::auth::Token;

use crate::args::ServeArgs;
use crate::telemetry;

pub(crate) async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let listen = listen_address(&args).await?;
    let token = |value: &Option<String>, option: &str| {
        value
            .as_deref()
            .filter(|t| !t.is_empty())
            .map(Token::new)
            .transpose()
            .with_context(|| format!("{option} is refused"))
    };
    let full_token = token(&args.token, "--token (DEPLOYD_TOKEN)")?;
    let task_token = token(&args.task_token, "--task-token (DEPLOYD_TASK_TOKEN)")?;
    if task_token.is_some() && full_token.is_none() {
        bail!(
            "--task-token (DEPLOYD_TASK_TOKEN) is set without --token (DEPLOYD_TOKEN): nobody \
             could deploy; set both"
        );
    }
    if !listen.ip().is_loopback() && full_token.is_none() && !args.insecure_no_auth {
        bail!(
            "refusing to listen on {listen} without a token: deployments run code, so anyone \
             who reaches this port could run code on this machine. Set DEPLOYD_TOKEN (or \
             --token; at least 16 characters, e.g. `openssl rand -hex 32`), or listen on a \
             loopback address, or pass --insecure-no-auth when something in front \
             authenticates for deployd"
        );
    }
    let guarded = full_token.is_some();
    let telemetry = match args.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        Some(endpoint) => Some(telemetry::start(endpoint)?),
        None => None,
    };
    let data_dir = args
        .data_dir
        .clone()
        .or_else(|| std::env::var_os("LLAMA_DEPLOY_APISERVER_DEPLOYMENTS_PATH").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(".deployd"));
    let manager_options = Options::new(&data_dir)
        .max_deployments(args.max_deployments)
        .drain_timeout(args.drain_timeout)
        .unready_timeout(args.unready_timeout)
        .head_timeout(args.head_timeout)
        .log_max_bytes(args.service_log_max)
        .retention(
            args.retention
                .map_or(Some(deployd_manager::DEFAULT_RETENTION), |r| r.0),
        )
        .variable_prefixes(args.allow_env_prefixes.clone())
        .store(args.store.clone().unwrap_or(StoreLocation::DataDir))
        .queue(args.queue.clone().filter(|q| !q.is_empty()))
        .map_err(anyhow::Error::msg)?
        .graph_store(args.graph_store.clone().filter(|g| !g.is_empty()))
        .map_err(anyhow::Error::msg)?
        .cluster(cluster_options(&args, listen)?);
    let store_shown = manager_options.store.shown();
    // Draining, then stopping the services, then a margin: the whole shutdown's deadline.
    let shutdown_deadline =
        manager_options.drain_timeout + manager_options.stop_timeout + Duration::from_secs(5);
    let manager = Manager::start(manager_options).await.with_context(|| {
        format!(
            "cannot start on data directory {} with store {store_shown}",
            data_dir.display()
        )
    })?;
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(err) => {
            manager.shutdown().await;
            return Err(err).with_context(|| format!("cannot listen on {listen}"));
        }
    };
    // llama_deploy's rc folder first (its files are relative to it), then the files named.
    let mut files: Vec<(PathBuf, Option<PathBuf>)> = rc_files(&args)
        .into_iter()
        .map(|file| (file, Some(args.rc_path.clone())))
        .collect();
    files.extend(args.files.iter().map(|file| (file.clone(), None)));
    for (file, base) in &files {
        if let Err(err) = deploy_file(&manager, file, base.as_deref()).await {
            tracing::error!(file = %file.display(), error = %format!("{err:#}"), "cannot deploy");
        }
    }
    let address = listener.local_addr().unwrap_or(listen);
    let mut options = ApiOptions::new(address)
        .run_timeout(args.run_timeout)
        .tokens(full_token, task_token)
        .max_body_bytes(args.max_body_bytes)
        .max_file_bytes(args.max_deployment_file_bytes)
        .max_streams(args.max_event_streams);
    for host in args.allow_hosts {
        options = options.allow_host(host);
    }
    for origin in args.cors_origins {
        options = options.allow_cors_origin(origin);
    }
    for dir in args.allow_base_paths {
        options = options.allow_base_path(dir);
    }
    tracing::info!(
        address = %address,
        data_dir = %manager.options().data_dir.display(),
        hosts = %options.allowed_hosts.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        "deployd listening on http://{address} ({})",
        if guarded {
            "requests need a token"
        } else if address.ip().is_loopback() {
            "loopback only, no token"
        } else {
            "NO TOKEN: anyone who reaches this address can run code"
        },
    );

    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(deployd_server::serve(
        listener,
        manager.clone(),
        options,
        async move {
            let _ = server_stopped.await;
        },
    ));
    shutdown_signal().await;
    tracing::info!("shutting down");
    // The server stops taking connections first, so that a wait the Manager's shutdown cuts
    // answers "shutting down"; stopping the Manager stops the services and ends open streams,
    // so that the server can drain. The whole shutdown has a deadline.
    let drained = tokio::time::timeout(shutdown_deadline, async {
        let _ = stop_server.send(());
        manager.shutdown().await;
        let _ = server.await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("shutdown deadline passed; exiting");
    }
    if let Some(telemetry) = telemetry {
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    }
    Ok(())
}

/// The address to listen on: `--listen`, with the host and port of llama_deploy's settings
/// when they are given.
async fn listen_address(args: &ServeArgs) -> anyhow::Result<SocketAddr> {
    let mut listen = args
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 4501)));
    if let Some(port) = args.port {
        listen.set_port(port);
    }
    if let Some(host) = &args.host {
        let found = tokio::net::lookup_host((host.as_str(), listen.port()))
            .await
            .with_context(|| format!("cannot resolve the host `{host}`"))?
            .next()
            .with_context(|| format!("the host `{host}` has no address"))?;
        listen = found;
    }
    Ok(listen)
}

/// The deployment files of llama_deploy's rc folder: the one its deployment file path names,
/// or every `.yml` and `.yaml` file in it, by name; none when the folder does not exist.
fn rc_files(args: &ServeArgs) -> Vec<PathBuf> {
    let one = args
        .deployment_file_path
        .clone()
        .or_else(|| std::env::var_os("DEPLOYMENT_FILE_PATH").map(PathBuf::from));
    if !args.rc_path.is_dir() {
        if let Some(one) = one {
            tracing::warn!(rc_path = %args.rc_path.display(), file = %one.display(), "the rc folder does not exist; nothing deployed from it");
        }
        return Vec::new();
    }
    if let Some(one) = one {
        return vec![args.rc_path.join(one)];
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&args.rc_path)
        .map(|dir| {
            dir.flatten()
                .map(|entry| entry.path())
                .filter(|path| {
                    path.is_file()
                        && path
                            .extension()
                            .is_some_and(|ext| ext == "yml" || ext == "yaml")
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Deploys a file from the server's disk, its local sources relative to `base` (the file's
/// folder when `None`).
async fn deploy_file(manager: &Manager, file: &Path, base: Option<&Path>) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let absolute = std::path::absolute(file)?;
    let base = match base {
        Some(base) => std::path::absolute(base)?,
        None => absolute.parent().unwrap_or(Path::new("/")).to_owned(),
    };
    let base = base.as_path();
    let deployed = manager
        .deploy_from(
            &text,
            &file.display().to_string(),
            base,
            true,
            FileOrigin::Operator,
        )
        .await?;
    for warning in &deployed.warnings {
        tracing::warn!(deployment = %deployed.status.name, "{warning}");
    }
    tracing::info!(deployment = %deployed.status.name, "deployed {}", file.display());
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(err) => {
            tracing::error!(error = %err, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The node's part in a cluster, from `--cluster`, `--advertise` and `--lease`.
fn cluster_options(
    args: &ServeArgs,
    listen: std::net::SocketAddr,
) -> anyhow::Result<Option<ClusterOptions>> {
    let Some(name) = args.cluster.as_deref().filter(|n| !n.is_empty()) else {
        if args.advertise.is_some() || args.lease.is_some() {
            bail!("--advertise and --lease are for a node of a cluster: add --cluster NAME");
        }
        return Ok(None);
    };
    let address = args
        .advertise
        .clone()
        .or_else(|| (listen.port() != 0).then(|| format!("http://{listen}")));
    let mut options = ClusterOptions::new(name)
        .map_err(anyhow::Error::msg)?
        .address(address);
    if let Some(lease) = args.lease {
        options = options.lease(lease);
    }
    Ok(Some(options))
}
