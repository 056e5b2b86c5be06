use std::{fmt, io, path::PathBuf, time::Duration};

/// Everything the harness can fail with. One type for the whole crate so that a test can
/// return `Result<(), Error>` and use `?` on any harness call.
#[derive(thiserror::Error)]
pub enum Error {
    #[error(
        "root tests need root (uid 0) for network namespaces, the agent and BPF; \
         run them as root, or set MYELIN_SKIP_ROOT_TESTS=1 to skip them on purpose"
    )]
    NotRoot,
    #[error("binary {} not found: {hint}", path.display())]
    MissingBinary { path: PathBuf, hint: String },
    #[error("could not start `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` did not finish within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("entering network namespace {name}")]
    EnterNetns {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("{context}")]
    Json {
        context: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{context}")]
    Yaml {
        context: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{context}")]
    Api {
        context: String,
        #[source]
        source: myelin_api::ClientError,
    },
    /// The agent did not come up; carries its log.
    #[error("myelin-agent on {node}: {reason}\n--- agent log ---\n{log}--- end of agent log ---")]
    Agent {
        node: String,
        reason: String,
        log: String,
    },
    /// The CNI plugin answered something other than what the harness needed.
    #[error("CNI {command} {what}\n{output}")]
    Cni {
        command: String,
        what: String,
        output: String,
    },
    /// Traffic that should have passed did not.
    #[error("{what}")]
    Traffic { what: String },
    #[error("cluster YAML: {0}")]
    Cluster(String),
    #[error("sweeping leftovers of earlier runs failed: {0}")]
    Sweep(String),
    #[error("containerd: {0}")]
    Containerd(String),
    #[error("{0}")]
    Demo(String),
    #[error("{context}")]
    Bpf {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("interrupted")]
    Interrupted,
}

impl Error {
    /// For `map_err`: an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }

    pub fn json(context: impl Into<String>) -> impl FnOnce(serde_json::Error) -> Self {
        let context = context.into();
        move |source| Self::Json { context, source }
    }

    /// For `map_err` on aya calls: what was being asked of the kernel.
    pub fn bpf<E: std::error::Error + Send + Sync + 'static>(
        context: impl Into<String>,
    ) -> impl FnOnce(E) -> Self {
        let context = context.into();
        move |source| Self::Bpf {
            context,
            source: Box::new(source),
        }
    }

    pub fn api(context: impl Into<String>) -> impl FnOnce(myelin_api::ClientError) -> Self {
        let context = context.into();
        move |source| Self::Api { context, source }
    }
}

/// A test returning `Err` is printed with `{:?}`: show the message and its causes, not the
/// enum's structure.
impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")?;
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            write!(f, "\n  caused by: {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_lists_the_causes() {
        let err = Error::io("reading /x")(io::Error::new(io::ErrorKind::NotFound, "gone"));
        assert_eq!(format!("{err:?}"), "reading /x\n  caused by: gone");
    }
}
