// SPDX-License-Identifier: EUPL-1.2
//! Signals in a job of ranks on one machine, as safe functions: the launcher
//! passes Ctrl-C and SIGTERM on to rank 0 (which ends the job in order), the
//! other ranks leave stopping to rank 0, and a rank whose launcher was killed
//! outright exits at once. On platforms without Unix signals these do nothing.

#[cfg(unix)]
mod imp {
    use std::io::Write;
    use std::sync::atomic::{AtomicI32, Ordering};
    use std::time::Duration;

    static RANK0: AtomicI32 = AtomicI32::new(0);

    extern "C" fn pass_on(_signal: libc::c_int) {
        let pid = RANK0.load(Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: kill is async-signal-safe; pid is our child's.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }

    pub(super) fn forward_to(pid: u32, interactive: bool) {
        let Ok(pid) = i32::try_from(pid) else { return };
        RANK0.store(pid, Ordering::SeqCst);
        let handler = pass_on as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: installing a handler that only calls an async-signal-safe function, or
        // ignoring a signal.
        unsafe {
            libc::signal(libc::SIGINT, if interactive { libc::SIG_IGN } else { handler });
            libc::signal(libc::SIGTERM, handler);
        }
    }

    pub(super) fn ignore_interrupts() {
        // SAFETY: setting the disposition of two signals to "ignore".
        unsafe {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
        }
    }

    pub(super) fn exit_with_launcher(note: String) {
        let parent = std::os::unix::process::parent_id();
        let _ = std::thread::Builder::new().name("launcher-watch".into()).spawn(move || {
            loop {
                std::thread::park_timeout(Duration::from_millis(250));
                if std::os::unix::process::parent_id() != parent {
                    // Standard error may be a pipe to the dead launcher: a failed write is fine.
                    let _ = writeln!(std::io::stderr(), "{note}");
                    // At once: exit handlers could wait on MLX's threads, blocked on a peer.
                    // SAFETY: _exit ends the process without running anything else.
                    unsafe { libc::_exit(1) }
                }
            }
        });
    }

    pub(super) fn exit_now(note: &str, code: i32) -> ! {
        // Standard error may be a closed pipe: a failed write is fine.
        let _ = writeln!(std::io::stderr(), "{note}");
        // SAFETY: _exit ends the process without running anything else.
        unsafe { libc::_exit(code) }
    }
}

#[cfg(not(unix))]
mod imp {
    pub(super) fn forward_to(_pid: u32, _interactive: bool) {}
    pub(super) fn ignore_interrupts() {}
    pub(super) fn exit_with_launcher(_note: String) {}

    pub(super) fn exit_now(note: &str, code: i32) -> ! {
        eprintln!("{note}");
        std::process::exit(code)
    }
}

/// For the launcher: Ctrl-C and SIGTERM become SIGTERM to rank 0 (process
/// `pid`), which ends the job in order. With an `interactive` rank 0 (it reads
/// the terminal), Ctrl-C is left to it — the terminal sends it to the whole
/// process group, and a chat cancels its current turn — and only SIGTERM is
/// passed on.
pub fn forward_to_rank0(pid: u32, interactive: bool) {
    imp::forward_to(pid, interactive);
}

/// For ranks other than 0: ignore Ctrl-C and SIGTERM and leave stopping to
/// rank 0 (a terminal's Ctrl-C reaches every rank).
pub fn ignore_interrupts() {
    imp::ignore_interrupts();
}

/// For every rank: a watcher thread that ends this process at once, after
/// writing `note` to standard error, when the launcher (the parent process)
/// has gone — killed outright, nobody would stop this rank. Exit handlers are
/// not run: they could wait on MLX's threads, blocked on a peer.
pub fn exit_with_launcher(note: impl Into<String>) {
    imp::exit_with_launcher(note.into());
}

/// Writes `note` to standard error and ends this process at once with exit
/// status `code`, without running exit handlers: for a rank whose collective
/// waits on a peer that will never answer (MLX's collectives cannot be
/// cancelled, and its exit handlers could wait on the blocked threads).
pub fn exit_now(note: &str, code: i32) -> ! {
    imp::exit_now(note, code)
}
