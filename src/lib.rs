//! The `kiln` binary's library: the embedded cluster ([`embedded`]) that `kiln up` runs,
//! the cluster-mode processes ([`cluster`]),
//! the client commands ([`client`]) and the benchmarks ([`bench`], and [`bench_floor`], the
//! canned-answer server Kiln is measured against). Cluster tests in `tests/` drive both.

#![forbid(unsafe_code)]

pub mod batch;
pub mod bench;
pub mod bench_floor;
pub mod bench_placement;
pub mod client;
pub mod cluster;
pub mod embedded;
pub mod otlp;
pub mod otlp_sink;
pub mod plot;
pub mod telemetry;
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
