//! Where the binaries under test are. Cargo hands `CARGO_BIN_EXE_*` only to a package's own
//! tests, so this package finds `quiesce` and `order-service` in the target directory it was
//! built into (`target/<profile>/`, the parent of `deps/`): `cargo nextest run --workspace`
//! builds them there, and `scripts/reliability.sh` builds them before the release run.
//! `E2E_QUIESCE_BIN` / `E2E_ORDER_SERVICE_BIN` override.

use std::path::PathBuf;

fn profile_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let deps = exe.parent()?;
    if deps.file_name()? == "deps" {
        deps.parent().map(PathBuf::from)
    } else {
        Some(deps.to_path_buf())
    }
}

fn find(name: &str, var: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    let dir = profile_dir().unwrap_or_else(|| PathBuf::from("target/debug"));
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is missing: build it into the same target directory first \
         (`cargo build -p quiesce -p order-service --bins`, with `--release` for a release run; \
         scripts/reliability.sh does it), or point {var} at it",
        p.display()
    );
    p
}

/// The supervisor binary.
pub fn quiesce() -> PathBuf {
    find("quiesce", "E2E_QUIESCE_BIN")
}

/// The reference app binary.
pub fn order_service() -> PathBuf {
    find("order-service", "E2E_ORDER_SERVICE_BIN")
}
