//! Python packages from PyPI for tests that check a wire format against an implementation
//! nobody here wrote: a virtual environment per package set under the target directory's
//! `tmp/` (`CARGO_TARGET_TMPDIR`), installed the first time (idempotently, and safely when
//! several test binaries start at once).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;

/// The target directory's `tmp/` (the one `CARGO_TARGET_TMPDIR` names), found from the
/// running test binary (`target/<profile>/deps/<binary>`).
pub(crate) fn target_tmp() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile = exe
        .ancestors()
        .nth(2)
        .context("the test binary is not under target/<profile>/deps")?;
    let target = profile.parent().context("no target directory")?;
    Ok(target.join("tmp"))
}

/// The interpreter of venv `name` with `requirements` (pinned, e.g. `rdflib==7.6.0`)
/// installed.
pub fn venv(name: &str, requirements: &[&str]) -> anyhow::Result<PathBuf> {
    let venv = target_tmp()?.join(name);
    let python = venv.join("bin/python");
    let installed = venv.join(format!(".installed-{}", requirements.join("+")));
    if installed.exists() {
        return Ok(python);
    }
    std::fs::create_dir_all(venv.parent().context("venv parent")?)?;
    // Test binaries may install at once: the first to create the lock directory installs.
    let lock = venv.with_extension("lock");
    let deadline = Instant::now() + Duration::from_secs(300);
    while std::fs::create_dir(&lock).is_err() {
        if installed.exists() {
            return Ok(python);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "another test holds {lock:?} for too long; remove it if no test runs"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let result = (|| {
        if !installed.exists() {
            run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
            run(Command::new(&python)
                .args(["-m", "pip", "install", "--quiet"])
                .args(requirements))?;
            std::fs::write(&installed, b"")?;
        }
        anyhow::Ok(())
    })();
    let _ = std::fs::remove_dir(&lock);
    result.map(|()| python)
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command.output().with_context(|| format!("{command:?}"))?;
    anyhow::ensure!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
