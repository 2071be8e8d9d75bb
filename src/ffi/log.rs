//! The host's log callback (process-wide), and the panic hook that routes a caught panic's report
//! to it instead of stderr.

use std::cell::Cell;
use std::ffi::c_void;
use std::sync::{Once, PoisonError, RwLock};

use plugin_api::{LORAFUSE_LOG_ERROR, LORAFUSE_LOG_INFO, LORAFUSE_LOG_WARN, LorafuseLogFn};

use super::handles::c_string;

#[derive(Clone, Copy)]
struct Sink {
    f: unsafe extern "C" fn(userdata: *mut c_void, level: u32, message: *const std::ffi::c_char),
    userdata: usize,
}

static SINK: RwLock<Option<Sink>> = RwLock::new(None);

/// The library's warnings (e.g. `device auto` falling back to the CPU) go to the host's callback.
fn library_warning(msg: &str) -> bool {
    emit(LORAFUSE_LOG_WARN, msg)
}

pub(crate) fn set(f: LorafuseLogFn, userdata: *mut c_void) {
    crate::runtime::set_warning_sink(Some(library_warning));
    let sink = f.map(|f| Sink {
        f,
        userdata: userdata as usize,
    });
    *SINK.write().unwrap_or_else(PoisonError::into_inner) = sink;
}

fn sink() -> Option<Sink> {
    *SINK.read().unwrap_or_else(PoisonError::into_inner)
}

/// Send one message to the host's callback, if it set one. Returns whether it did.
pub(crate) fn emit(level: u32, msg: &str) -> bool {
    let Some(s) = sink() else { return false };
    let c = c_string(msg);
    // SAFETY: the host promised a callable function; the lock is not held during the call.
    unsafe { (s.f)(s.userdata as *mut c_void, level, c.as_ptr()) };
    true
}

pub(crate) fn info(msg: &str) {
    emit(LORAFUSE_LOG_INFO, msg);
}

pub(crate) fn warn(msg: &str) {
    emit(LORAFUSE_LOG_WARN, msg);
}

thread_local! {
    /// How many guarded entries this thread is inside (callbacks can re-enter the plugin).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Marks the current thread as inside a C entry while alive.
pub(crate) struct InEntry;

impl InEntry {
    pub(crate) fn enter() -> InEntry {
        install_panic_hook();
        DEPTH.with(|d| d.set(d.get() + 1));
        InEntry
    }
}

impl Drop for InEntry {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

/// Once per process: a panic inside a C entry is reported to the log callback (when the host set
/// one) instead of stderr; any other panic goes to the hook that was there before.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let inside = DEPTH.try_with(|d| d.get() > 0).unwrap_or(false);
            if inside {
                let at = info
                    .location()
                    .map(|l| format!(" at {}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                let msg = format!("internal error{at}: {}", super::panic_text(info.payload()));
                if emit(LORAFUSE_LOG_ERROR, &msg) {
                    return;
                }
            }
            previous(info);
        }));
    });
}
