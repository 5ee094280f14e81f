//! Finding and loading the ONNX Runtime shared library, and the one process-wide ORT environment.
//!
//! `ort` is built with `load-dynamic`: nothing is linked at build time, and any ort call made before a
//! library is loaded makes ort look for one itself and panic when it fails. So every entry point calls
//! [`init`] first. It tries, in order: the explicit path (`--ort-lib` / `ORT_DYLIB_PATH`), the project's
//! own `.venv` (the one `make setup` provisions), an active virtualenv, then the system's library paths,
//! and reports every candidate it tried when none loads.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;

/// The command that provisions the library, quoted in the not-found error.
pub const FIX_COMMAND: &str =
    "make setup   (creates .venv with onnxruntime==1.31.1 from requirements.txt)";

/// The wheel version whose library this build is tested against.
pub const EXPECTED_ORT_VERSION: &str = "1.31.1";

static ENVIRONMENT: OnceLock<(Environment, PathBuf)> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "could not load the ONNX Runtime library (libonnxruntime, {EXPECTED_ORT_VERSION}).\n  tried:\n{tried}\n  fix: run `{FIX_COMMAND}`,\n       or point --ort-lib / ORT_DYLIB_PATH at libonnxruntime.so.{EXPECTED_ORT_VERSION}"
    )]
    NotFound { tried: String },
    #[error("ONNX Runtime loaded from {path} but its environment could not be created: {message}")]
    Environment { path: PathBuf, message: String },
}

/// One candidate library path and where it came from (for the error message).
#[derive(Debug, Clone)]
struct Candidate {
    path: PathBuf,
    origin: &'static str,
}

/// Loads ONNX Runtime (once per process) and returns the shared environment.
///
/// `explicit` is `--ort-lib` (clap also fills it from `ORT_DYLIB_PATH`). When an explicit path is given
/// only that path is tried: a user who names a library wants that one, not a silent fallback.
pub fn init(explicit: Option<&Path>) -> Result<&'static Environment, RuntimeError> {
    if let Some((env, _)) = ENVIRONMENT.get() {
        return Ok(env);
    }
    // An empty ORT_DYLIB_PATH counts as unset.
    let explicit = explicit.filter(|p| !p.as_os_str().is_empty());
    let candidates = match explicit {
        Some(p) => vec![Candidate {
            path: p.to_path_buf(),
            origin: "--ort-lib / ORT_DYLIB_PATH",
        }],
        None => default_candidates(),
    };
    let mut tried = Vec::new();
    for c in candidates {
        if c.path.is_absolute() && !c.path.exists() {
            tried.push(format!(
                "    {} ({}): no such file",
                c.path.display(),
                c.origin
            ));
            continue;
        }
        match ort::init_from(&c.path) {
            Ok(builder) => {
                let env = builder
                    .with_name("onnx-chat")
                    .with_telemetry(false)
                    .build()
                    .map_err(|e| RuntimeError::Environment {
                        path: c.path.clone(),
                        message: e.to_string(),
                    })?;
                tracing::info!(library = %c.path.display(), origin = c.origin, "loaded ONNX Runtime");
                let _ = ENVIRONMENT.set((env, c.path));
                return Ok(&ENVIRONMENT.get().expect("just set").0);
            }
            Err(e) => tried.push(format!("    {} ({}): {e}", c.path.display(), c.origin)),
        }
    }
    Err(RuntimeError::NotFound {
        tried: tried.join("\n"),
    })
}

/// The path of the library that [`init`] loaded, if any.
pub fn loaded_library() -> Option<&'static Path> {
    ENVIRONMENT.get().map(|(_, p)| p.as_path())
}

fn default_candidates() -> Vec<Candidate> {
    let mut out = Vec::new();
    // The project's .venv: next to the sources this binary was built from, next to the working directory,
    // and above the executable (target/{debug,release}/onnx-chat → ../../.venv).
    let mut roots = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR"))];
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(root) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
            roots.push(root.to_path_buf());
        }
    }
    let mut seen = std::collections::HashSet::new();
    for root in roots {
        let venv = root.join(".venv");
        if seen.insert(venv.clone()) {
            for p in venv_libraries(&venv) {
                out.push(Candidate {
                    path: p,
                    origin: "project .venv",
                });
            }
            if !venv_has_site_packages(&venv) {
                out.push(Candidate {
                    path: venv
                        .join("lib/python3.X/site-packages/onnxruntime/capi/libonnxruntime.so.*"),
                    origin: "project .venv (missing)",
                });
            }
        }
    }
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        for p in venv_libraries(Path::new(&v)) {
            out.push(Candidate {
                path: p,
                origin: "$VIRTUAL_ENV",
            });
        }
    }
    for dir in [
        "/usr/local/lib",
        "/usr/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/opt/onnxruntime/lib",
    ] {
        for name in ["libonnxruntime.so", "libonnxruntime.so.1"] {
            let p = Path::new(dir).join(name);
            if p.exists() {
                out.push(Candidate {
                    path: p,
                    origin: "system library directory",
                });
            }
        }
    }
    // Last: the dynamic loader's own search (LD_LIBRARY_PATH, ld.so.cache).
    out.push(Candidate {
        path: PathBuf::from("libonnxruntime.so"),
        origin: "dynamic loader search path",
    });
    out
}

fn venv_has_site_packages(venv: &Path) -> bool {
    !site_packages(venv).is_empty()
}

fn site_packages(venv: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for lib in ["lib", "lib64"] {
        let Ok(rd) = std::fs::read_dir(venv.join(lib)) else {
            continue;
        };
        let mut dirs: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("python3"))
            })
            .map(|p| p.join("site-packages"))
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        out.extend(dirs);
    }
    out
}

/// `onnxruntime/capi/libonnxruntime.so.<version>` files in a virtualenv, the expected version first.
fn venv_libraries(venv: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sp in site_packages(venv) {
        let capi = sp.join("onnxruntime").join("capi");
        let Ok(rd) = std::fs::read_dir(&capi) else {
            continue;
        };
        let mut libs: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libonnxruntime.so"))
            })
            .collect();
        libs.sort_by_key(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            (!n.ends_with(EXPECTED_ORT_VERSION), n.to_string())
        });
        out.extend(libs);
    }
    out
}

/// Returns freed heap memory to the system (glibc keeps freed blocks of a load — the rewritten graph
/// bytes, a load check's sessions — in its arenas otherwise, where they count as resident).
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and shrinks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn venv_libraries_prefers_expected_version() {
        let dir = tempfile::tempdir().unwrap();
        let capi = dir
            .path()
            .join("lib/python3.11/site-packages/onnxruntime/capi");
        std::fs::create_dir_all(&capi).unwrap();
        std::fs::write(capi.join("libonnxruntime.so.1.20.0"), b"").unwrap();
        std::fs::write(
            capi.join(format!("libonnxruntime.so.{EXPECTED_ORT_VERSION}")),
            b"",
        )
        .unwrap();
        std::fs::write(capi.join("onnxruntime_pybind11_state.so"), b"").unwrap();
        let libs = venv_libraries(dir.path());
        assert_eq!(libs.len(), 2);
        assert!(libs[0].to_string_lossy().ends_with(EXPECTED_ORT_VERSION));
    }
}
