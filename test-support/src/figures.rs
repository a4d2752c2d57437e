//! Figure lines (drain histograms, resume times, ...) of the cross-process and outage tests.

/// Prints `line`, and appends it to the file `PARLEY_FIGURES_FILE` names when set: the test command prints that
/// file in its summary, since a passing test's own output is captured.
pub fn report(line: &str) {
    println!("{line}");
    if let Some(path) = std::env::var_os("PARLEY_FIGURES_FILE") {
        use std::io::Write;
        if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(file, "{line}");
        }
    }
}
