//! Records the torch version the extension is compiled against, so that
//! `import cera_rs` can refuse a different one with a readable message instead of an
//! undefined-symbol error. Uses the interpreter torch-sys uses to find libtorch.

use std::env;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    if env::var_os("CARGO_FEATURE_PYTHON").is_none() {
        return;
    }
    let python = if env::var_os("VIRTUAL_ENV").is_some() {
        "python"
    } else {
        "python3"
    };
    let output = Command::new(python)
        .args(["-c", "import torch; print(torch.__version__)"])
        .output()
        .expect("cannot run python to read torch.__version__");
    assert!(
        output.status.success(),
        "python could not import torch: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let version = String::from_utf8_lossy(&output.stdout).trim().to_string();
    println!("cargo:rustc-env=CERA_RS_TORCH_VERSION={version}");
}
