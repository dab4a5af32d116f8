//! Named points where crash tests stop a process (not part of the API).
//!
//! The runtime calls [`point`] at places where a crash is interesting. Normally nothing
//! happens; a crash test's child process installs a hook with [`set_hook`] that, at the chosen
//! point, tells its parent and waits to be killed.

use std::sync::OnceLock;

type Hook = Box<dyn Fn(&'static str) + Send + Sync>;

static HOOK: OnceLock<Hook> = OnceLock::new();

/// Between a node's end and the commit of its successor.
pub const AFTER_NODE: &str = "runner.after_node";
/// Halfway through writing a commit to a file store's log.
pub const MID_WRITE: &str = "file.mid_write";
/// Right after a file store took its lock.
pub const LOCKED: &str = "file.locked";

/// Installs the process's hook; returns false if one is installed already.
pub fn set_hook(hook: impl Fn(&'static str) + Send + Sync + 'static) -> bool {
    HOOK.set(Box::new(hook)).is_ok()
}

/// Calls the hook, if any, with `name`.
pub fn point(name: &'static str) {
    if let Some(hook) = HOOK.get() {
        hook(name);
    }
}
