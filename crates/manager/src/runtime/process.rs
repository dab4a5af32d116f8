//! The `process` runtime: the service's own `command`, after its `build` commands.

use async_trait::async_trait;

use super::{Prepare, Prepared, Runtime};
use crate::Error;
use crate::prepare;

/// Runs a service's `command`.
pub(crate) struct Process;

#[async_trait]
impl Runtime for Process {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn prepare(&self, request: Prepare<'_>) -> Result<Prepared, Error> {
        let service = request.service;
        let Some(command) = service.command.clone() else {
            return Err(Error::BadRequest(format!(
                "service `{}` has no `command`",
                service.id
            )));
        };
        let built = prepare::build(prepare::Build {
            service,
            workdir: request.workdir,
            env: &request.env,
            log: request.build_log,
            marks: request.marks,
        })
        .await?;
        if built {
            tracing::info!(service = %service.id, "build finished");
        }
        Ok(Prepared {
            command,
            env: request.env,
        })
    }
}
