//! The `kiln` binary's library: the embedded cluster ([`embedded`]) that `kiln up` runs,
//! the cluster-mode processes ([`cluster`]),
//! the client commands ([`client`]) and `kiln bench` ([`bench`]). Cluster tests in `tests/`
//! drive them. Benchmark servers live in the `kiln-bench` binary (`bench/`), not here.

#![forbid(unsafe_code)]

pub mod bench;
pub mod client;
pub mod cluster;
pub mod datasets;
pub mod embedded;
pub mod headless;
pub mod jobs;
pub mod plot;
pub mod tokens;
pub mod train;

/// Write a line to standard output. A closed pipe (`kiln … | head -1`) ends the process
/// quietly with success instead of a panic.
pub fn say_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{args}")
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
    }
}

/// `println!` for the CLI, through [`say_line`].
#[macro_export]
macro_rules! say {
    () => {
        $crate::say_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::say_line(format_args!($($arg)*))
    };
}

/// Resolves on Ctrl-C or SIGTERM: what every long-running command stops on.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
