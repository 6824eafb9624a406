//! With the `python` feature: links the aggregator to the libpython of the interpreter pyo3
//! builds against (PYO3_PYTHON, see .cargo/config.toml) by rpath, and compiles in that
//! interpreter's home, so that at run time the embedded interpreter takes its standard library
//! from the same installation, whatever `python3` is first on PATH.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "python")]
    python();
}

#[cfg(feature = "python")]
fn python() {
    pyo3_build_config::add_libpython_rpath_link_args();
    let config = pyo3_build_config::get();
    let Some(executable) = config.executable() else {
        println!(
            "cargo:warning=pyo3 names no Python executable; the aggregator will use the home compiled into libpython"
        );
        return;
    };
    let output = std::process::Command::new(executable)
        .args(["-c", "import sys; print(sys.base_prefix)"])
        .output();
    match output {
        Ok(output) if output.status.success() => {
            let home = String::from_utf8_lossy(&output.stdout).trim().to_string();
            println!("cargo:rustc-env=RONDO_PYTHON_HOME={home}");
        }
        other => println!("cargo:warning=could not ask {executable} for its home: {other:?}"),
    }
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
}
