//! Which Python runs, and which packages it sees.
//!
//! The interpreter is the one the aggregator was built against (`PYO3_PYTHON`, the repo's
//! `.venv` by default): the binary loads its libpython by rpath, and its home (standard
//! library) is compiled in by `build.rs`, so neither depends on which `python3` comes first on
//! PATH (left to itself, an embedded CPython derives its home from that). `PYTHONHOME`, when
//! set, still wins. Packages: a virtualenv's `site-packages` (`[aggregation.python] venv`, else
//! `$VIRTUAL_ENV`) go in front of `sys.path`, `.pth` files processed (editable installs work).

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// The home of the interpreter the aggregator was built against.
const BUILD_HOME: Option<&str> = option_env!("RONDO_PYTHON_HOME");

/// Initializes the interpreter on the calling thread (which becomes Python's main thread) and
/// releases the GIL.
pub(super) fn initialize() -> Result<(), String> {
    // SAFETY: called once per process (from the worker's `OnceLock`), before any other use of
    // the Python API; every PyConfig function gets the config it initialized.
    unsafe {
        if ffi::Py_IsInitialized() != 0 {
            return Ok(());
        }
        let mut config = std::mem::MaybeUninit::<ffi::PyConfig>::uninit();
        ffi::PyConfig_InitPythonConfig(config.as_mut_ptr());
        let config = config.as_mut_ptr();
        // The aggregator owns SIGINT/SIGTERM (graceful shutdown), and its command line is not
        // Python's.
        (*config).install_signal_handlers = 0;
        (*config).parse_argv = 0;
        let mut status = ffi::PyStatus_Ok();
        if std::env::var_os("PYTHONHOME").is_none()
            && let Some(home) = BUILD_HOME
            && let Ok(home_c) = CString::new(home)
        {
            status = ffi::PyConfig_SetBytesString(config, &mut (*config).home, home_c.as_ptr());
            // sys.executable: this interpreter, not whatever python3 PATH finds first.
            let executable = base_executable(Path::new(home));
            if ffi::PyStatus_Exception(status) == 0
                && let Some(executable) = executable.and_then(|p| CString::new(p).ok())
            {
                status = ffi::PyConfig_SetBytesString(
                    config,
                    &mut (*config).program_name,
                    executable.as_ptr(),
                );
            }
        }
        if ffi::PyStatus_Exception(status) == 0 {
            status = ffi::Py_InitializeFromConfig(config);
        }
        ffi::PyConfig_Clear(config);
        if ffi::PyStatus_Exception(status) != 0 {
            let message = if status.err_msg.is_null() {
                "unknown error".to_string()
            } else {
                CStr::from_ptr(status.err_msg)
                    .to_string_lossy()
                    .into_owned()
            };
            return Err(format!(
                "initializing Python (home {}) failed: {message}",
                BUILD_HOME.unwrap_or("compiled into libpython")
            ));
        }
        ffi::PyEval_SaveThread();
    }
    Ok(())
}

fn base_executable(home: &Path) -> Option<String> {
    ["python3", "python"]
        .iter()
        .map(|name| home.join("bin").join(name))
        .find(|path| path.exists())
        .map(|path| path.to_string_lossy().into_owned())
}

/// The virtualenv the config names, else `$VIRTUAL_ENV`, else none.
pub(super) fn chosen_venv(configured: &str) -> Option<PathBuf> {
    if !configured.is_empty() {
        return Some(PathBuf::from(configured));
    }
    std::env::var_os("VIRTUAL_ENV")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Puts `venv`'s site-packages in front of `sys.path`. Fails when it has none for this
/// interpreter's version (a virtualenv of another Python cannot be used).
pub(super) fn add_venv(py: Python<'_>, venv: &Path) -> Result<PathBuf, String> {
    let version = py.version_info();
    let site = venv
        .join("lib")
        .join(format!("python{}.{}", version.major, version.minor))
        .join("site-packages");
    if !site.is_dir() {
        return Err(format!(
            "aggregation.python.venv = {:?}: {} is not a directory (the aggregator embeds Python {}.{}; the venv must be one of that version)",
            venv.display(),
            site.display(),
            version.major,
            version.minor
        ));
    }
    let locals = PyDict::new(py);
    let run = || -> PyResult<()> {
        locals.set_item("site_dir", site.to_string_lossy().as_ref())?;
        py.run(
            c"import site, sys
before = list(sys.path)
site.addsitedir(site_dir)
added = [p for p in sys.path if p not in before]
sys.path[:] = added + before",
            // As globals: a comprehension does not see an exec's separate locals.
            Some(&locals),
            None,
        )
    };
    run().map_err(|e| format!("adding {} to sys.path failed: {e}", site.display()))?;
    Ok(site)
}

/// One line about the interpreter, for the start-up log.
pub(super) fn describe(py: Python<'_>) -> String {
    let sys = py.import("sys");
    let get = |name: &str| -> String {
        sys.as_ref()
            .ok()
            .and_then(|sys| sys.getattr(name).ok())
            .map(|v| v.to_string())
            .unwrap_or_default()
    };
    let numpy = py
        .import("numpy")
        .and_then(|np| np.getattr("__version__"))
        .map(|v| v.to_string())
        .unwrap_or_else(|_| "missing".into());
    format!(
        "Python {} at {} (sys.prefix {}), numpy {numpy}",
        get("version").split_whitespace().next().unwrap_or(""),
        get("base_prefix"),
        get("prefix"),
    )
}
