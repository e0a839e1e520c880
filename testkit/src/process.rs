//! Child processes a test starts: their output goes to a log file, they can be signalled
//! (SIGKILL, SIGTERM, SIGSTOP, SIGCONT) and awaited under a deadline, and when the test
//! fails the tail of every log is printed next to the failure.
//!
//! Every child is killed when its handle is dropped (`kill_on_drop`), so a failing test
//! leaves no process behind.

use std::ffi::OsStr;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::wait::POLL;

/// Lines of the log printed when a test fails while the process is alive.
const TAIL_ON_FAILURE: usize = 40;

/// `program` with a clean environment: no inherited `SHOAL__*`, `SHOAL_CONFIG` or
/// `RUST_LOG`, working in `dir` (a temporary directory, so no `cluster-config/` is picked
/// up), stdin closed, killed when dropped.
pub fn shoal_command(program: impl AsRef<OsStr>, dir: &Path) -> Command {
    let mut command = Command::new(program);
    for (key, _) in std::env::vars() {
        if key.starts_with("SHOAL__") || key == "SHOAL_CONFIG" || key == "RUST_LOG" {
            command.env_remove(key);
        }
    }
    command
        // Runners refuse the built-in secret; the diagnostic types are off by default.
        .env("SHOAL__CLUSTER__SECRET", CLUSTER_SECRET)
        .env("SHOAL__DIAGNOSTICS__ENABLED", "true")
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// The cluster secret [`shoal_command`] gives every child (a test may set another).
pub const CLUSTER_SECRET: &str = "shoal-test-cluster-secret";

/// Runs `command` to its end, collecting stdout and stderr; fails if it takes longer than
/// `deadline` (the child is killed then).
pub async fn output_within(command: &mut Command, deadline: Duration) -> anyhow::Result<Output> {
    let program = command
        .as_std()
        .get_program()
        .to_string_lossy()
        .into_owned();
    let args: Vec<String> = command
        .as_std()
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    tokio::time::timeout(deadline, command.kill_on_drop(true).output())
        .await
        .with_context(|| format!("{program} {args:?} did not exit within {deadline:?}"))?
        .with_context(|| format!("running {program} {args:?}"))
}

/// Sends `signal` to process `pid`.
pub fn signal_pid(pid: u32, signal: Signal) -> anyhow::Result<()> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
    nix::sys::signal::kill(pid, signal).with_context(|| format!("sending {signal} to {pid}"))
}

/// A child process whose stdout and stderr go to a log file (killed when dropped).
#[derive(Debug)]
pub struct ChildProcess {
    name: String,
    child: Child,
    log: PathBuf,
}

impl ChildProcess {
    /// Spawns `command` as `name` (for messages), its output written to `log`.
    pub fn spawn(
        name: impl Into<String>,
        command: &mut Command,
        log: impl Into<PathBuf>,
    ) -> anyhow::Result<Self> {
        let (name, log) = (name.into(), log.into());
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = command
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self { name, child, log })
    }

    /// Its name, as given to [`ChildProcess::spawn`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its pid, while it has not been reaped.
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits until `ready` returns `Ok(true)`, failing at once if the process exits first
    /// (with its status) and after `deadline` with `ready`'s last error.
    pub async fn await_ready<F, Fut>(
        &mut self,
        deadline: Duration,
        what: &str,
        mut ready: F,
    ) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<bool>>,
    {
        let started = Instant::now();
        let mut last_error = None;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited during start-up with {status}", self.name);
            }
            match ready().await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(error) => last_error = Some(error),
            }
            if started.elapsed() > deadline {
                let why = last_error.map(|e| format!(": {e:#}")).unwrap_or_default();
                bail!("{} was not {what} within {deadline:?}{why}", self.name);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.start_kill().context("sending SIGKILL")
    }

    /// SIGTERM: graceful shutdown.
    pub fn terminate(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGTERM)
    }

    /// SIGSTOP: the process stays, its sockets stay open, it makes no progress.
    pub fn freeze(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    /// SIGCONT after [`ChildProcess::freeze`].
    pub fn thaw(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGCONT)
    }

    /// Sends `signal`.
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self
            .child
            .id()
            .with_context(|| format!("{} has exited", self.name))?;
        signal_pid(pid, signal)
    }

    /// Its exit status, if it has exited.
    pub fn exit_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, deadline: Duration) -> anyhow::Result<ExitStatus> {
        tokio::time::timeout(deadline, self.child.wait())
            .await
            .with_context(|| format!("{} did not exit within {deadline:?}", self.name))?
            .with_context(|| format!("waiting for {}", self.name))
    }

    /// Where its output goes.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process has written so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        // Shown with the test's output when it fails: a child starved of connections is a
        // shortage on the server, not a bug.
        if self.log().contains("too many clients") {
            let usage = crate::connections::latest().map_or_else(
                || "no sample of who holds them".to_owned(),
                |usage| usage.describe(),
            );
            eprintln!(
                "--- {} ran out of PostgreSQL connections (\"too many clients\"): {usage} ---",
                self.name
            );
        }
        if std::thread::panicking() {
            eprintln!(
                "--- {} log tail, full log in {} ---\n{}",
                self.name,
                self.log.display(),
                self.log_tail(TAIL_ON_FAILURE)
            );
        }
    }
}
