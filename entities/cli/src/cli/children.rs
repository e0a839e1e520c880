//! `shoal` subcommands run as children of this process (`shoal dev`'s cluster, the drill's
//! own cluster): spawned with the same binary, signalled, and stopped gracefully — SIGTERM,
//! then SIGKILL for whatever outlives the shutdown deadline — so no child is left behind.
//! Every child is also killed if its handle is dropped.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::Signal;
use tokio::process::{Child, Command};

/// How long a child may take to stop after SIGTERM before it is killed.
pub(crate) const STOP_DEADLINE: Duration = Duration::from_secs(20);

/// How a child stopped.
#[derive(Debug)]
pub(crate) enum Stopped {
    /// It exited by itself after SIGTERM.
    Exited(ExitStatus),
    /// It outlived [`STOP_DEADLINE`] and was killed.
    Killed,
}

/// A `shoal` subcommand running as a child (killed when dropped).
#[derive(Debug)]
pub(crate) struct ShoalChild {
    /// For messages (`runner 1 (127.0.0.1:4001)`).
    pub(crate) name: String,
    child: Child,
}

/// This binary with `args`: stdin closed, stdout discarded, stderr shared with this
/// process, killed on drop. Callers add the environment (and a process group) before
/// [`ShoalChild::spawn`].
pub(crate) fn shoal_command(args: &[&str]) -> anyhow::Result<Command> {
    let mut command = Command::new(current_exe()?);
    command
        .args(args)
        // A local cluster offers the diagnostic types its drills and tests use.
        .env("SHOAL__DIAGNOSTICS__ENABLED", "true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    Ok(command)
}

fn current_exe() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("locating the shoal binary")
}

impl ShoalChild {
    /// Starts `command` as `name`.
    pub(crate) fn spawn(name: impl Into<String>, command: &mut Command) -> anyhow::Result<Self> {
        let name = name.into();
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self { name, child })
    }

    /// Its pid, until it has been reaped.
    pub(crate) fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// Its exit status, if it has exited.
    pub(crate) fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Sends `signal` (nothing if it has already been reaped).
    pub(crate) fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        match self.child.id() {
            Some(pid) => signal_pid(pid, signal),
            None => Ok(()),
        }
    }

    /// SIGTERM, then waits up to [`STOP_DEADLINE`] and kills it if it is still there.
    pub(crate) async fn stop(&mut self) -> Stopped {
        let _ = self.signal(Signal::SIGTERM);
        self.await_stop().await
    }

    /// Waits up to [`STOP_DEADLINE`] for the exit a SIGTERM asked for; kills the child
    /// if it does not come.
    async fn await_stop(&mut self) -> Stopped {
        match tokio::time::timeout(STOP_DEADLINE, self.child.wait()).await {
            Ok(Ok(status)) => Stopped::Exited(status),
            _ => {
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
                Stopped::Killed
            }
        }
    }
}

/// SIGTERM to every child, last started first, then waits for each in turn (killing
/// whoever outlives [`STOP_DEADLINE`]); says on stderr how each one stopped.
pub(crate) async fn stop_all(children: &mut [ShoalChild]) {
    for child in children.iter().rev() {
        let _ = child.signal(Signal::SIGTERM);
    }
    for child in children.iter_mut() {
        match child.await_stop().await {
            Stopped::Exited(status) if status.success() => eprintln!("{} stopped", child.name),
            Stopped::Exited(status) => eprintln!("{} stopped with {status}", child.name),
            Stopped::Killed => eprintln!("{} killed after the shutdown deadline", child.name),
        }
    }
}

/// Sends `signal` to process `pid`.
pub(crate) fn signal_pid(pid: u32, signal: Signal) -> anyhow::Result<()> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
    nix::sys::signal::kill(pid, signal).with_context(|| format!("sending {signal} to {pid}"))
}

/// A TCP port on 127.0.0.1 that was free a moment ago (another process can take it before
/// the child binds it).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// `config` for a local cluster of child processes: the built-in cluster secret, which
/// runners refuse, is replaced by a random one for this cluster's lifetime (passed to the
/// children as `SHOAL__CLUSTER__SECRET`); a secret of the operator's own is kept.
pub(crate) fn with_local_secret(
    mut config: shoal::config::ShoalConfig,
) -> shoal::config::ShoalConfig {
    if config.cluster.secret == shoal::config::DEFAULT_SECRET {
        config.cluster.secret = format!("local-{}", uuid::Uuid::new_v4().simple());
    }
    config
}
