//! A typed client of the API, used by the `deployd` CLI.

use std::path::Path;

use deployd_api::{Deployed, DeploymentStatus, Status, TaskDefinition, TaskResult};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// What can go wrong calling the API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server could not be reached or the exchange failed.
    #[error("cannot reach deployd at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error.
    #[error("{detail} (HTTP {})", status.as_u16())]
    Api { status: StatusCode, detail: String },
    /// A local file could not be read.
    #[error("cannot read {path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A client of one deployd server.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
}

impl Client {
    /// A client of the server at `base` (`http://127.0.0.1:4501`).
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: base.into().trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .unwrap_or_default(),
            token: None,
        }
    }

    /// Sends `Authorization: Bearer <token>` with every request (the `deployd` CLI passes
    /// `DEPLOYD_TOKEN`, the variable `deployd serve` reads its token from).
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn unreachable(&self, source: reqwest::Error) -> Error {
        Error::Unreachable {
            url: self.base.clone(),
            source,
        }
    }

    /// Sends `request` with the token, and returns its answer when it is a success, else the
    /// server's `detail` as an [`Error::Api`].
    async fn respond(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, Error> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send().await.map_err(|e| self.unreachable(e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let detail = body
            .get("detail")
            .and_then(Value::as_str)
            .map_or_else(|| body.to_string(), str::to_owned);
        Err(Error::Api { status, detail })
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, Error> {
        self.respond(request)
            .await?
            .json()
            .await
            .map_err(|e| self.unreachable(e))
    }

    /// `GET /status/`.
    pub async fn status(&self) -> Result<Status, Error> {
        self.send(self.http.get(self.url("/status/"))).await
    }

    /// Deploys the file at `path`; its folder is the base of its local sources. Returns the
    /// deployment's name and the server's warnings about the file.
    pub async fn deploy(&self, path: &Path, reload: bool) -> Result<(String, Vec<String>), Error> {
        let file_error = |source| Error::File {
            path: path.display().to_string(),
            source,
        };
        let text = std::fs::read(path).map_err(file_error)?;
        let absolute = std::path::absolute(path).map_err(file_error)?;
        let base = absolute
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let file_name = path.file_name().map_or_else(
            || "deployment.yaml".to_owned(),
            |n| n.to_string_lossy().into_owned(),
        );
        let form = reqwest::multipart::Form::new().part(
            "config_file",
            reqwest::multipart::Part::bytes(text).file_name(file_name),
        );
        let answer: Deployed = self
            .send(
                self.http
                    .post(self.url("/deployments/create"))
                    .query(&[
                        ("base_path", base.as_str()),
                        ("reload", if reload { "true" } else { "false" }),
                        // The CLI follows the deploy's stages itself.
                        ("wait", "false"),
                    ])
                    .multipart(form),
            )
            .await?;
        Ok((answer.name, answer.warnings))
    }

    /// `GET /deployments/{name}/services/{service}/logs`: hands each piece of the answer to
    /// `chunk` as it comes (with `follow`, until the server ends the answer).
    pub async fn logs(
        &self,
        deployment: &str,
        service: &str,
        tail: Option<usize>,
        follow: bool,
        replica: usize,
        mut chunk: impl FnMut(&[u8]),
    ) -> Result<(), Error> {
        let mut request = self
            .http
            .get(self.url(&format!(
                "/deployments/{deployment}/services/{service}/logs"
            )))
            .query(&[("follow", if follow { "true" } else { "false" })])
            .query(&[("replica", replica)]);
        if let Some(tail) = tail {
            request = request.query(&[("tail", tail)]);
        }
        let mut response = self.respond(request).await?;
        while let Some(piece) = response.chunk().await.map_err(|e| self.unreachable(e))? {
            chunk(&piece);
        }
        Ok(())
    }

    /// `GET /deployments/{name}`.
    pub async fn deployment(&self, name: &str) -> Result<DeploymentStatus, Error> {
        self.send(self.http.get(self.url(&format!("/deployments/{name}"))))
            .await
    }

    /// `DELETE /deployments/{name}`.
    pub async fn delete(&self, name: &str) -> Result<(), Error> {
        let _: Value = self
            .send(self.http.delete(self.url(&format!("/deployments/{name}"))))
            .await?;
        Ok(())
    }

    /// Runs a task and returns its result.
    pub async fn run(
        &self,
        deployment: &str,
        service: Option<&str>,
        input: &Value,
    ) -> Result<Value, Error> {
        let body = json!({ "input": input.to_string(), "service_id": service });
        self.send(
            self.http
                .post(self.url(&format!("/deployments/{deployment}/tasks/run")))
                .json(&body),
        )
        .await
    }

    /// Creates a task and returns its definition with its ids.
    pub async fn create_task(
        &self,
        deployment: &str,
        service: Option<&str>,
        input: &Value,
    ) -> Result<TaskDefinition, Error> {
        let body = json!({ "input": input.to_string(), "service_id": service });
        self.send(
            self.http
                .post(self.url(&format!("/deployments/{deployment}/tasks/create")))
                .json(&body),
        )
        .await
    }

    /// The result of a task, once it has ended.
    pub async fn result(
        &self,
        deployment: &str,
        task_id: &str,
    ) -> Result<Option<TaskResult>, Error> {
        self.send(self.http.get(self.url(&format!(
            "/deployments/{deployment}/tasks/{task_id}/results"
        ))))
        .await
    }
    /// `GET /deployments/{name}/revisions`: the deployment's revisions, newest first.
    pub async fn revisions(&self, name: &str) -> Result<Vec<deployd_api::RevisionInfo>, Error> {
        self.send(
            self.http
                .get(self.url(&format!("/deployments/{name}/revisions"))),
        )
        .await
    }

    /// `POST /deployments/{name}/rollback?revision=N`: deploys revision `revision` again;
    /// answers once it serves.
    pub async fn rollback(&self, name: &str, revision: u64) -> Result<DeploymentStatus, Error> {
        self.send(
            self.http
                .post(self.url(&format!("/deployments/{name}/rollback")))
                .query(&[("revision", revision)]),
        )
        .await
    }

    /// `POST /deployments/{deployment}/tasks/{task_id}/cancel`.
    pub async fn cancel(
        &self,
        deployment: &str,
        task_id: &str,
    ) -> Result<deployd_api::TaskSummary, Error> {
        self.send(
            self.http
                .post(self.url(&format!("/deployments/{deployment}/tasks/{task_id}/cancel"))),
        )
        .await
    }
}
