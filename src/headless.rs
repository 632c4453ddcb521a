//! A quiet start on machines without a desktop session.
//!
//! Mesa installs an implicit Vulkan layer (`VK_LAYER_MESA_device_select`) that every
//! Vulkan program loads. When wgpu enumerates adapters, the layer tries to connect to a
//! Wayland compositor to learn which GPU drives the screen; on a server there is none,
//! and libwayland prints `error: XDG_RUNTIME_DIR is invalid or not set in the
//! environment.` once per probe, straight to standard error. Kiln's start is fine, but a
//! new user reads "error" and thinks it failed.
//!
//! The layer has nothing to choose without a display, and it is switched off by its own
//! documented variable, `NODEVICE_SELECT=1`. A process cannot safely change its own
//! environment once threads may run, so a serving command started without a display
//! re-executes itself once, at the very start, with that variable set (same process id,
//! arguments and everything else). With a display, or with the variable already set (by
//! the user or by this re-execution), nothing happens.

use std::ffi::OsString;

const SWITCH: &str = "NODEVICE_SELECT";

/// Whether a process with this environment should re-execute itself with the layer off.
fn should_reexec(var: impl Fn(&str) -> Option<OsString>) -> bool {
    let set = |name: &str| var(name).is_some_and(|v| !v.is_empty());
    !set(SWITCH) && !set("WAYLAND_DISPLAY") && !set("DISPLAY") && !set("XDG_RUNTIME_DIR")
}

/// Re-execute this process with `NODEVICE_SELECT=1` when it has no display (see the module
/// docs); returns only when it does not (or when the re-execution failed, in which case
/// the process goes on as it is: the cost is only the noise).
pub fn quiet_vulkan_probe() {
    if !should_reexec(|name| std::env::var_os(name)) {
        return;
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt as _;
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let mut args = std::env::args_os();
        let argv0 = args.next();
        let mut command = std::process::Command::new(exe);
        if let Some(argv0) = argv0 {
            command.arg0(argv0);
        }
        // `exec` returns only on failure.
        let _ = command.args(args).env(SWITCH, "1").exec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let pairs: Vec<(String, OsString)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn only_a_process_without_any_display_reexecutes_and_only_once() {
        assert!(should_reexec(env(&[])));
        assert!(
            should_reexec(env(&[("DISPLAY", "")])),
            "an empty value is no display"
        );
        assert!(
            !should_reexec(env(&[("NODEVICE_SELECT", "1")])),
            "the re-executed process"
        );
        assert!(!should_reexec(env(&[("DISPLAY", ":0")])));
        assert!(!should_reexec(env(&[("WAYLAND_DISPLAY", "wayland-0")])));
        assert!(!should_reexec(env(&[(
            "XDG_RUNTIME_DIR",
            "/run/user/1000"
        )])));
    }
}
