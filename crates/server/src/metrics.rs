//! `GET /status/metrics`: what deployd is doing, in Prometheus's text format (0.0.4).
//!
//! - `deployd_http_requests_total{method,route,status}` and
//!   `deployd_http_request_duration_seconds{method,route}` (until the answer's head; a streamed
//!   answer goes on after it), counted by a middleware around every route, refusals included.
//!   `route` is the route's template (`/deployments/{name}/tasks/run`), `unmatched` for any
//!   other path, so that the label's values stay few whatever clients send;
//! - `deployd_tasks{deployment,service,status}`: the tasks in the store, and
//!   `deployd_queue_oldest_task_age_seconds{deployment,service}`: how long the oldest queued task
//!   has waited (the queue's lag), read from the store when the page is asked for;
//! - `deployd_task_duration_seconds{deployment,service}`: a histogram of how long ended tasks
//!   took from their creation to their end (queueing included), read from the store too;
//! - `deployd_service_up{deployment,service}` (1 while ready) and
//!   `deployd_service_restarts_total{deployment,service}`;
//! - llama_deploy 0.9's state gauges, with its names and states, so that dashboards built on
//!   them keep working: `apiserver_state`, `deployment_state{deployment_name}`,
//!   `service_state{deployment_name,service_name}`.
//!
//! The format is written here: a few counters and one histogram do not need a client library,
//! and the page holds families read from the Manager when it is asked for.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::Method;
use deployd_manager::{DeploymentStatus, Phase, TaskCount, TaskDurations, TaskStatus};

/// The upper bounds of the task duration histogram, in seconds.
pub(crate) const TASK_BUCKETS: [f64; 11] = [
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
];

/// The upper bounds of the request duration histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    /// Observations at most each bound of [`BUCKETS`] (not cumulative here).
    buckets: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        if let Some(i) = BUCKETS.iter().position(|bound| seconds <= *bound) {
            self.buckets[i] += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }
}

type RequestKey = (&'static str, &'static str, u16);

/// The HTTP counters, shared by the middleware and the metrics page.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    requests: Mutex<BTreeMap<RequestKey, u64>>,
    durations: Mutex<BTreeMap<(&'static str, &'static str), Histogram>>,
}

impl Metrics {
    /// Counts one answered request.
    pub(crate) fn record(&self, method: &Method, path: &str, status: u16, took: Duration) {
        let (method, route) = (method_name(method), route_of(path));
        *lock(&self.requests)
            .entry((method, route, status))
            .or_default() += 1;
        lock(&self.durations)
            .entry((method, route))
            .or_default()
            .observe(took.as_secs_f64());
    }

    /// The page: the HTTP families, then those made from `deployments` and `tasks`.
    pub(crate) fn render(
        &self,
        stopping: bool,
        deployments: &[DeploymentStatus],
        tasks: &[TaskCount],
        durations: &[TaskDurations],
        now_ms: i64,
    ) -> String {
        let mut out = String::new();
        family(
            &mut out,
            "deployd_http_requests_total",
            "counter",
            "HTTP requests answered, by method, route and status.",
        );
        for ((method, route, status), count) in lock(&self.requests).iter() {
            sample(
                &mut out,
                "deployd_http_requests_total",
                &[
                    ("method", method),
                    ("route", route),
                    ("status", &status.to_string()),
                ],
                *count as f64,
            );
        }
        family(
            &mut out,
            "deployd_http_request_duration_seconds",
            "histogram",
            "Time until the answer's head, by method and route.",
        );
        for ((method, route), histogram) in lock(&self.durations).iter() {
            let name = "deployd_http_request_duration_seconds";
            let mut cumulative = 0;
            for (bound, count) in BUCKETS.iter().zip(histogram.buckets) {
                cumulative += count;
                sample(
                    &mut out,
                    &format!("{name}_bucket"),
                    &[
                        ("method", method),
                        ("route", route),
                        ("le", &bound.to_string()),
                    ],
                    cumulative as f64,
                );
            }
            let labels = [("method", *method), ("route", *route)];
            sample(
                &mut out,
                &format!("{name}_bucket"),
                &[("method", method), ("route", route), ("le", "+Inf")],
                histogram.count as f64,
            );
            sample(&mut out, &format!("{name}_sum"), &labels, histogram.sum);
            sample(
                &mut out,
                &format!("{name}_count"),
                &labels,
                histogram.count as f64,
            );
        }

        family(
            &mut out,
            "deployd_tasks",
            "gauge",
            "Tasks in the store, by deployment, service and status.",
        );
        for count in tasks {
            sample(
                &mut out,
                "deployd_tasks",
                &[
                    ("deployment", &count.deployment),
                    ("service", &count.service),
                    ("status", count.status.as_str()),
                ],
                count.count as f64,
            );
        }
        family(
            &mut out,
            "deployd_task_duration_seconds",
            "histogram",
            "How long ended tasks took, from their creation to their end.",
        );
        for service in durations {
            let name = "deployd_task_duration_seconds";
            let labels = [
                ("deployment", service.deployment.as_str()),
                ("service", service.service.as_str()),
            ];
            for (bound, count) in TASK_BUCKETS.iter().zip(&service.at_most) {
                sample(
                    &mut out,
                    &format!("{name}_bucket"),
                    &[labels[0], labels[1], ("le", &bound.to_string())],
                    *count as f64,
                );
            }
            sample(
                &mut out,
                &format!("{name}_bucket"),
                &[labels[0], labels[1], ("le", "+Inf")],
                service.count as f64,
            );
            sample(
                &mut out,
                &format!("{name}_sum"),
                &labels,
                service.sum_seconds,
            );
            sample(
                &mut out,
                &format!("{name}_count"),
                &labels,
                service.count as f64,
            );
        }
        family(
            &mut out,
            "deployd_queue_oldest_task_age_seconds",
            "gauge",
            "How long the oldest queued task of a service has waited.",
        );
        for count in tasks.iter().filter(|c| c.status == TaskStatus::Queued) {
            sample(
                &mut out,
                "deployd_queue_oldest_task_age_seconds",
                &[
                    ("deployment", &count.deployment),
                    ("service", &count.service),
                ],
                (now_ms - count.oldest_ms).max(0) as f64 / 1000.0,
            );
        }

        family(
            &mut out,
            "deployd_service_up",
            "gauge",
            "1 while the service's instance is ready to take tasks.",
        );
        for deployment in deployments {
            for service in &deployment.services {
                sample(
                    &mut out,
                    "deployd_service_up",
                    &[("deployment", &deployment.name), ("service", &service.id)],
                    f64::from(u8::from(service.phase == Phase::Ready)),
                );
            }
        }
        family(
            &mut out,
            "deployd_service_restarts_total",
            "counter",
            "How many times the service's instance was restarted.",
        );
        for deployment in deployments {
            for service in &deployment.services {
                sample(
                    &mut out,
                    "deployd_service_restarts_total",
                    &[("deployment", &deployment.name), ("service", &service.id)],
                    f64::from(service.restarts),
                );
            }
        }

        // llama_deploy 0.9's gauges (prometheus_client `Enum`s: one sample per state, 1 for the
        // current one).
        family(
            &mut out,
            "apiserver_state",
            "gauge",
            "Current state of the API server",
        );
        let current = if stopping { "stopped" } else { "running" };
        for state in ["starting", "running", "stopped"] {
            sample(
                &mut out,
                "apiserver_state",
                &[("apiserver_state", state)],
                f64::from(u8::from(state == current)),
            );
        }
        family(
            &mut out,
            "deployment_state",
            "gauge",
            "Current state of a deployment",
        );
        for deployment in deployments {
            let current = deployment_state(deployment);
            for state in [
                "loading_services",
                "ready",
                "starting_services",
                "running",
                "stopped",
            ] {
                sample(
                    &mut out,
                    "deployment_state",
                    &[
                        ("deployment_name", &deployment.name),
                        ("deployment_state", state),
                    ],
                    f64::from(u8::from(state == current)),
                );
            }
        }
        family(
            &mut out,
            "service_state",
            "gauge",
            "Current state of a service attached to a deployment",
        );
        for deployment in deployments {
            for service in &deployment.services {
                let current = service_state(service);
                for state in ["loading", "syncing", "installing", "ready"] {
                    sample(
                        &mut out,
                        "service_state",
                        &[
                            ("deployment_name", &deployment.name),
                            ("service_name", &service.id),
                            ("service_state", state),
                        ],
                        f64::from(u8::from(state == current)),
                    );
                }
            }
        }
        out
    }
}

/// llama_deploy's state of a deployment: `loading_services` while a deploy of it runs, `ready`
/// once every service is, `starting_services` otherwise.
fn deployment_state(deployment: &DeploymentStatus) -> &'static str {
    if deployment.deploying {
        "loading_services"
    } else if deployment.services.iter().all(|s| s.phase == Phase::Ready) {
        "ready"
    } else {
        "starting_services"
    }
}

/// llama_deploy's state of a service: `ready` while its instance is, `syncing` or
/// `installing` while its deploy is in those stages, `loading` otherwise.
fn service_state(service: &deployd_manager::ServiceStatus) -> &'static str {
    if service.phase == Phase::Ready {
        return "ready";
    }
    match service.stage.as_ref() {
        Some(stage) if stage.state == "running" && stage.stage == "sync" => "syncing",
        Some(stage) if stage.state == "running" && stage.stage == "prepare" => "installing",
        _ => "loading",
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn method_name(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The template of the route a path goes to; `unmatched` for any other path.
pub(crate) fn route_of(path: &str) -> &'static str {
    let segments: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    match segments.as_slice() {
        [] => "/",
        ["status"] => "/status/",
        ["status", "metrics"] => "/status/metrics",
        ["openapi.json"] => "/openapi.json",
        ["docs"] => "/docs",
        ["deployments"] => "/deployments/",
        ["deployments", "create"] => "/deployments/create",
        ["deployments", _] => "/deployments/{name}",
        ["deployments", _, "delete"] => "/deployments/{name}/delete",
        ["deployments", _, "tasks"] => "/deployments/{name}/tasks",
        ["deployments", _, "tasks", "create"] => "/deployments/{name}/tasks/create",
        ["deployments", _, "tasks", "run"] => "/deployments/{name}/tasks/run",
        ["deployments", _, "tasks", "search"] => "/deployments/{name}/tasks/search",
        ["deployments", _, "tasks", _] => "/deployments/{name}/tasks/{task_id}",
        ["deployments", _, "tasks", _, "cancel"] => "/deployments/{name}/tasks/{task_id}/cancel",
        ["deployments", _, "revisions"] => "/deployments/{name}/revisions",
        ["deployments", _, "revisions", _] => "/deployments/{name}/revisions/{revision}",
        ["deployments", _, "rollback"] => "/deployments/{name}/rollback",
        ["console", ..] => "/console",
        ["deployments", _, "tasks", _, "results"] => "/deployments/{name}/tasks/{task_id}/results",
        ["deployments", _, "tasks", _, "events"] => "/deployments/{name}/tasks/{task_id}/events",
        ["deployments", _, "services", _, "logs"] => "/deployments/{name}/services/{service}/logs",
        ["deployments", _, "services", _, "graph"] => {
            "/deployments/{name}/services/{service}/graph"
        }
        ["deployments", _, "sessions"] => "/deployments/{name}/sessions",
        ["deployments", _, "sessions", "create"] => "/deployments/{name}/sessions/create",
        ["deployments", _, "sessions", "delete"] => "/deployments/{name}/sessions/delete",
        ["deployments", _, "sessions", "search"] => "/deployments/{name}/sessions/search",
        ["deployments", _, "sessions", _] => "/deployments/{name}/sessions/{session_id}",
        ["deployments", _, "ui", ..] => "/deployments/{name}/ui/{path}",
        _ => "unmatched",
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (key, value)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{key}=\"");
            for c in value.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '"' => out.push_str("\\\""),
                    '\n' => out.push_str("\\n"),
                    c => out.push(c),
                }
            }
            out.push('"');
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_templates_and_other_paths_one_value() {
        assert_eq!(
            route_of("/deployments/a/tasks/123/events"),
            "/deployments/{name}/tasks/{task_id}/events"
        );
        assert_eq!(
            route_of("/deployments/a/tasks/run"),
            "/deployments/{name}/tasks/run"
        );
        assert_eq!(route_of("/status/"), "/status/");
        assert_eq!(
            route_of("/deployments/a/sessions/s1"),
            "/deployments/{name}/sessions/{session_id}"
        );
        for odd in [
            "/x",
            "/deployments/a/b/c/d/e",
            "/deployments/a/tasks/t/other",
        ] {
            assert_eq!(route_of(odd), "unmatched", "{odd}");
        }
    }

    #[test]
    fn the_page_counts_requests_and_escapes_labels() {
        let metrics = Metrics::default();
        metrics.record(&Method::GET, "/status/", 200, Duration::from_millis(2));
        metrics.record(&Method::GET, "/status/", 200, Duration::from_millis(20));
        metrics.record(
            &Method::POST,
            "/deployments/a\"b/tasks/run",
            401,
            Duration::ZERO,
        );
        let page = metrics.render(false, &[], &[], &[], 0);
        assert!(page.contains(
            "deployd_http_requests_total{method=\"GET\",route=\"/status/\",status=\"200\"} 2\n"
        ));
        assert!(page.contains(
            "deployd_http_requests_total{method=\"POST\",route=\"/deployments/{name}/tasks/run\",status=\"401\"} 1\n"
        ));
        assert!(page.contains(
            "deployd_http_request_duration_seconds_bucket{method=\"GET\",route=\"/status/\",le=\"0.005\"} 1\n"
        ));
        assert!(page.contains(
            "deployd_http_request_duration_seconds_bucket{method=\"GET\",route=\"/status/\",le=\"+Inf\"} 2\n"
        ));
        assert!(page.contains("apiserver_state{apiserver_state=\"running\"} 1\n"));
        let mut out = String::new();
        sample(&mut out, "m", &[("l", "a\"b\\c\nd")], 1.0);
        assert_eq!(out, "m{l=\"a\\\"b\\\\c\\nd\"} 1\n");
    }
}
