//! The client commands (`deploy`, `run`, `status`, `logs`, `delete`, `validate`), and the
//! dispatch of `serve`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use deployd_server::client::Client;
use serde_json::Value;

use crate::args::{Cli, Command, DefaultServe};
use crate::serve::serve;

pub(crate) async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    let mut client = Client::new(&cli.server);
    // The token comes from the environment only (an option would show it in `ps`).
    if let Some(token) = std::env::var("DEPLOYD_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
    {
        client = client.with_token(token);
    }
    match cli.command {
        None => {
            let DefaultServe { args } = DefaultServe::try_parse_from(["deployd"])?;
            Box::pin(serve(args))
                .await
                .map(|()| std::process::ExitCode::SUCCESS)
        }
        Some(Command::Serve(args)) => Box::pin(serve(*args))
            .await
            .map(|()| std::process::ExitCode::SUCCESS),
        Some(Command::Deploy {
            file,
            reload,
            no_wait,
        }) => {
            let (name, warnings) = client.deploy(&file, reload).await?;
            for warning in warnings {
                eprintln!("{warning}");
            }
            println!("deployment `{name}` created");
            if !no_wait {
                wait_ready(&client, &name).await?;
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Some(Command::Run {
            deployment,
            service,
            input,
            arg,
        }) => {
            let input = task_input(input.as_deref(), &arg)?;
            let result = client.run(&deployment, service.as_deref(), &input).await?;
            match result {
                Value::String(text) => println!("{text}"),
                other => println!("{}", serde_json::to_string_pretty(&other)?),
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Some(Command::Status { name: None }) => {
            let status = client.status().await?;
            println!("{}", serde_json::to_string_pretty(&status)?);
            Ok(std::process::ExitCode::SUCCESS)
        }
        Some(Command::Status { name: Some(name) }) => {
            let status = client.deployment(&name).await?;
            println!(
                "deployment {} (default service: {})",
                status.name, status.default_service
            );
            for service in status.services {
                println!(
                    "  {:<20} {:<10} port {:<5} pid {:<8} restarts {}{}",
                    service.id,
                    format!("{:?}", service.phase).to_lowercase(),
                    service.port,
                    service
                        .pid
                        .map_or_else(|| "-".to_owned(), |p| p.to_string()),
                    service.restarts,
                    service
                        .last_exit
                        .map(|e| format!(" (last exit: {e})"))
                        .unwrap_or_default(),
                );
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Some(Command::History { deployment }) => {
            let revisions = client.revisions(&deployment).await?;
            println!(
                "{:>4}  {:<20}  {:<9} {:<10} {:<24} sources",
                "rev", "when (UTC)", "kind", "outcome", "by"
            );
            for r in &revisions {
                let kind = match r.rollback_of {
                    Some(of) => format!("{}→{of}", r.kind),
                    None => r.kind.clone(),
                };
                let sources: Vec<String> = r
                    .sources
                    .iter()
                    .map(|(id, s)| {
                        let shown = s.commit.as_deref().unwrap_or(&s.digest);
                        let shown = shown.strip_prefix("sha256:").unwrap_or(shown);
                        format!("{id}@{}", &shown[..shown.len().min(10)])
                    })
                    .collect();
                println!(
                    "{:>4}  {:<20}  {:<9} {:<10} {:<24} {}",
                    r.revision,
                    utc(r.created_at),
                    kind,
                    r.outcome,
                    r.by,
                    sources.join(" ")
                );
                if let Some(error) = &r.error {
                    println!("      {}", error.lines().next().unwrap_or_default());
                }
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Some(Command::Rollback {
            deployment,
            revision,
        }) => {
            let revision = match revision {
                Some(revision) => revision,
                None => {
                    // The newest revision that deployed, before the newest one.
                    let revisions = client.revisions(&deployment).await?;
                    revisions
                        .iter()
                        .skip(1)
                        .find(|r| r.outcome == "deployed")
                        .map(|r| r.revision)
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "deployment `{deployment}` has no earlier revision that \
                                 deployed; name one (see `deployd history {deployment}`)"
                            )
                        })?
                }
            };
            client.rollback(&deployment, revision).await?;
            println!("deployment `{deployment}` rolled back to revision {revision}");
            Ok(std::process::ExitCode::SUCCESS)
        }
        Some(Command::Cancel {
            deployment,
            task_id,
        }) => {
            let task = client.cancel(&deployment, &task_id).await?;
            println!("task {} {}", task.task_id, task.status);
            Ok(std::process::ExitCode::SUCCESS)
        }
        Some(Command::Delete { name }) => {
            client.delete(&name).await?;
            println!("deployment `{name}` deleted");
            Ok(std::process::ExitCode::SUCCESS)
        }
        Some(Command::Logs {
            deployment,
            service,
            follow,
            tail,
            replica,
        }) => {
            let service = match service {
                Some(service) => service,
                None => client.deployment(&deployment).await?.default_service,
            };
            let mut stdout = std::io::stdout();
            client
                .logs(&deployment, &service, tail, follow, replica, |chunk| {
                    use std::io::Write;
                    let _ = stdout.write_all(chunk);
                    let _ = stdout.flush();
                })
                .await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Some(Command::Validate { files }) => Ok(validate(&files)),
    }
}

fn task_input(input: Option<&str>, args: &[String]) -> anyhow::Result<Value> {
    if let Some(input) = input {
        let value: Value = serde_json::from_str(input).context("--input is not valid JSON")?;
        if !value.is_object() {
            bail!("--input must be a JSON object of keyword arguments");
        }
        return Ok(value);
    }
    let mut object = serde_json::Map::new();
    for pair in args.chunks(2) {
        if let [key, value] = pair {
            let value =
                serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.clone()));
            object.insert(key.clone(), value);
        }
    }
    Ok(Value::Object(object))
}

/// The stages of a deploy, in order.
const STAGES: [&str; 5] = ["sync", "prepare", "launch", "ready", "switch"];

/// Follows a deploy until it ends, with a progress bar per service; fails naming the stage and
/// the error of every service that failed.
async fn wait_ready(client: &Client, name: &str) -> anyhow::Result<()> {
    let bars = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template("{prefix:>16} [{bar:25}] {msg}")
        .map(|style| style.progress_chars("=> "))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    let mut service_bars: Vec<(String, indicatif::ProgressBar)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1800);
    loop {
        let status = client.deployment(name).await?;
        for service in &status.services {
            let bar = match service_bars.iter().find(|(id, _)| *id == service.id) {
                Some((_, bar)) => bar.clone(),
                None => {
                    let bar = bars.add(indicatif::ProgressBar::new(STAGES.len() as u64));
                    bar.set_style(style.clone());
                    bar.set_prefix(service.id.clone());
                    service_bars.push((service.id.clone(), bar.clone()));
                    bar
                }
            };
            if let Some(stage) = &service.stage {
                let index = STAGES.iter().position(|s| *s == stage.stage).unwrap_or(0);
                let passed = if stage.state == "done" {
                    index + 1
                } else {
                    index
                };
                bar.set_position(passed as u64);
                bar.set_message(format!("{} {}", stage.stage, stage.state));
            }
        }
        if !status.deploying {
            for (_, bar) in &service_bars {
                bar.finish();
            }
            let failed: Vec<String> = status
                .services
                .iter()
                .filter_map(|service| {
                    let stage = service.stage.as_ref()?;
                    (stage.state == "failed").then(|| {
                        format!(
                            "service `{}` failed in stage {}: {}",
                            service.id,
                            stage.stage,
                            stage.error.as_deref().unwrap_or("unknown error")
                        )
                    })
                })
                .collect();
            if !failed.is_empty() {
                bail!("{}", failed.join("\n"));
            }
            for service in &status.services {
                println!("  {} ready on port {}", service.id, service.port);
            }
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the deploy of `{name}` has not ended after 30 minutes; see `deployd status {name}`"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn validate(files: &[PathBuf]) -> std::process::ExitCode {
    let mut failed = false;
    for file in files {
        let origin = file.display().to_string();
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(err) => {
                eprintln!("{origin}: error: cannot read: {err}");
                failed = true;
                continue;
            }
        };
        match deployd_config::parse(&text, &origin) {
            Ok(loaded) => {
                if !loaded.warnings.is_empty() {
                    eprint!("{}", deployd_config::render_all(&loaded.warnings, &text));
                }
                println!("{origin}: ok ({} warnings)", loaded.warnings.len());
            }
            Err(diagnostics) => {
                eprint!("{}", diagnostics.render(&text));
                failed = true;
            }
        }
    }
    if failed {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}

/// `ms` since the epoch as `YYYY-MM-DD HH:MM:SS` (UTC).
fn utc(ms: i64) -> String {
    let rfc3339 = deployd_graph::Timestamp::from_micros(ms.saturating_mul(1000)).to_string();
    format!("{} {}", &rfc3339[..10], &rfc3339[11..19])
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_show_in_utc() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(1_796_515_200_000), "2026-12-06 00:00:00");
        assert_eq!(
            super::utc(951_782_400_000 + 3_661_000),
            "2000-02-29 01:01:01"
        );
    }
}
