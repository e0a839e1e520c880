//! Shoal's test harness, shared by the runtime's integration tests and benches (`tests/`,
//! `benches/`) and the application's (`entities/cli/tests/`). Dev-only: nothing ships with it.
//!
//! - [`db`] — a fresh PostgreSQL database per test ([`TestDb`]), dropped even when the test
//!   panics.
//! - [`mod@redis`] — the shared Redis's URL, a key prefix per test and its cleanup, and a
//!   `redis-server` of a test's own that can be killed and restarted ([`OwnRedis`]).
//! - [`process`] — child processes with their output in a log file, signalled (SIGKILL,
//!   SIGTERM, SIGSTOP, SIGCONT) and run to their end under a deadline; the log's tail is
//!   printed when the test fails ([`ChildProcess`]).
//! - [`connections`] — the PostgreSQL connection budget: the suite's peak recorded under
//!   `target/tmp/pg-connections/`, a warning when the server nears its limit.
//! - [`wait`] — [`wait_until`] a condition holds, under a deadline ([`DEADLINE`]).
//! - [`net`] — [`free_port`].
//! - [`browser`] — headless Chromium over WebDriver ([`Browser`]), installed with
//!   `apt-get` if missing.
//! - [`python`] — a venv with PyPI packages, installed once per target directory.
//! - [`provider`] — a fake language-model provider speaking the OpenAI chat-completions and
//!   Anthropic Messages wire formats, with a call log and scripted failures.
//! - [`webhook`] — a webhook [`Receiver`] that verifies signatures with the Standard
//!   Webhooks project's Python package.
//!
//! Everything reads its servers from the environment: `SHOAL_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and `SHOAL_TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379`).

pub mod browser;
pub mod connections;
pub mod db;
pub mod net;
pub mod process;
pub mod provider;
pub mod python;
pub mod redis;
pub mod wait;
pub mod webhook;

pub use self::redis::OwnRedis;
pub use browser::Browser;
pub use db::TestDb;
pub use net::free_port;
pub use process::ChildProcess;
pub use wait::{DEADLINE, wait_until};
pub use webhook::Receiver;
