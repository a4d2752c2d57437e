//! Prints the CRD YAML of every Parley kind, or writes it into `crds/` and `charts/parley/crds/`.
//!
//! ```sh
//! cargo run -p parley-crds --bin crdgen            # print all CRDs as one multi-document YAML stream
//! cargo run -p parley-crds --bin crdgen -- --write # regenerate the committed files
//! ```

use std::process::ExitCode;

fn main() -> ExitCode {
    let write = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--write") => true,
        Some(other) => {
            eprintln!("unknown argument {other}; usage: crdgen [--write]");
            return ExitCode::from(2);
        }
    };
    match run(write) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("crdgen: {error}");
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}

fn run(write: bool) -> Result<(), parley_crds::Error> {
    if !write {
        for (kind, crd) in parley_crds::crds() {
            print!("---\n{}", parley_crds::render_crd(kind, &crd)?);
        }
        return Ok(());
    }
    let root = parley_crds::workspace_root();
    for (relative, contents) in parley_crds::generated_files()? {
        let path = root.join(&relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|source| parley_crds::Error::WriteFile { path: parent.to_path_buf(), source })?;
        }
        std::fs::write(&path, contents)
            .map_err(|source| parley_crds::Error::WriteFile { path: path.clone(), source })?;
        eprintln!("wrote {}", relative.display());
    }
    Ok(())
}
