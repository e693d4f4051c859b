//! C ABI for rfork: `librfork.so` / `librfork.a` with `include/rfork.h`.
//!
//! Every function takes and returns plain integers: no pointer crosses the boundary, so no
//! `unsafe` block exists here. The one unsafe token is the `#[unsafe(no_mangle)]` attribute that
//! exports a symbol under its C name; lint `unsafe_code` is denied crate-wide and allowed item
//! by item for that attribute alone (see ARCHITECTURE.md, "unsafe policy").
//!
//! Events are read by C directly from the fd returned by `rfork_events_fd`: the 32-byte
//! records are `struct rfork_event` (layout in `rfork::event`).
#![deny(unsafe_code)]

use std::ffi::{c_int, c_uint};
use std::sync::Mutex;
use std::time::Duration;

use rfork::{Config, Design, EventKind, Forked, Intensity, Policy, RestartOn, Supervised};

/// Handles of the children this process rforked, by keeper pid.
static CHILDREN: Mutex<Vec<Supervised>> = Mutex::new(Vec::new());

/// Returned by `rfork_wait`/`rfork_shutdown` OR-ed into the status when supervision gave up.
pub const RFORK_GAVE_UP: c_int = 0x100;

fn take(keeper: c_int) -> Option<Supervised> {
    let mut v = CHILDREN.lock().unwrap_or_else(|p| p.into_inner());
    let i = v.iter().position(|s| s.keeper_pid().as_raw() == keeper)?;
    Some(v.swap_remove(i))
}

fn with<T>(keeper: c_int, f: impl FnOnce(&Supervised) -> T) -> Option<T> {
    let v = CHILDREN.lock().unwrap_or_else(|p| p.into_inner());
    v.iter().find(|s| s.keeper_pid().as_raw() == keeper).map(f)
}

fn errno(e: &rfork::Error) -> c_int {
    use std::error::Error as _;
    match e {
        rfork::Error::Config(_) => -libc_einval(),
        other => -other
            .source()
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .and_then(std::io::Error::raw_os_error)
            .unwrap_or(5),
    }
}

const fn libc_einval() -> c_int {
    22
}

/// rfork(design, restart_on, max_restarts, within_ms, watchdog_ms, notify_signal).
/// design: 0 monitor, 1 kept image. restart_on: 0 on-crash, 1 on-failure, 2 always,
/// 3 on-request. max_restarts 0 = unlimited. watchdog_ms 0 = none. notify_signal 0 = none.
/// Returns the keeper pid (> 0) in the parent, 0 in the child (every generation), -errno.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
pub extern "C" fn rfork_rfork(
    design: c_int,
    restart_on: c_int,
    max_restarts: c_uint,
    within_ms: c_uint,
    watchdog_ms: c_uint,
    notify_signal: c_int,
) -> c_int {
    let design = match design {
        0 => Design::Monitor,
        1 => Design::KeptImage,
        _ => return -libc_einval(),
    };
    let restart = match restart_on {
        0 => RestartOn::OnCrash,
        1 => RestartOn::OnFailure,
        2 => RestartOn::Always,
        3 => RestartOn::OnRequest,
        _ => return -libc_einval(),
    };
    let intensity = if max_restarts == 0 {
        Intensity::UNLIMITED
    } else {
        Intensity {
            max_restarts,
            within: Duration::from_millis(u64::from(within_ms)),
        }
    };
    let cfg = Config {
        design,
        policy: Policy {
            restart,
            intensity,
            backoff: None,
        },
        watchdog: (watchdog_ms > 0).then(|| Duration::from_millis(u64::from(watchdog_ms))),
        notify_signal: (notify_signal > 0).then_some(notify_signal),
        ..Config::default()
    };
    match rfork::rfork(&cfg) {
        Ok(Forked::Parent(s)) => {
            let pid = s.keeper_pid().as_raw();
            CHILDREN.lock().unwrap_or_else(|p| p.into_inner()).push(s);
            pid
        }
        Ok(Forked::Child(_)) => {
            // A child inherits the parent's table of handles: they are not its children.
            CHILDREN
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain(..)
                .for_each(|s| {
                    s.detach();
                });
            0
        }
        Err(e) => errno(&e),
    }
}

/// The fd to read `struct rfork_event` records from (poll it in an event loop). -ENOENT for
/// an unknown keeper. The fd stays owned by the library until rfork_wait/rfork_shutdown.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
pub extern "C" fn rfork_events_fd(keeper: c_int) -> c_int {
    use std::os::fd::{AsFd, AsRawFd};
    with(keeper, |s| s.events().as_fd().as_raw_fd()).unwrap_or(-2)
}

/// Waits until supervision ends; returns the last worker's status as a shell reports it
/// (exit code, or 128 + signal), OR-ed with RFORK_GAVE_UP if restarts came too fast; -errno.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
pub extern "C" fn rfork_wait(keeper: c_int) -> c_int {
    finish(keeper, Supervised::wait)
}

/// Terminates the child (SIGTERM, SIGKILL after 2 s) and ends supervision; returns as rfork_wait.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
pub extern "C" fn rfork_shutdown(keeper: c_int) -> c_int {
    finish(keeper, Supervised::shutdown)
}

fn finish(
    keeper: c_int,
    f: impl FnOnce(Supervised) -> Result<rfork::Outcome, rfork::Error>,
) -> c_int {
    let Some(s) = take(keeper) else { return -10 }; // ECHILD
    match f(s) {
        Ok(o) => {
            let gave_up = o.last.is_some_and(|e| e.kind == EventKind::GaveUp);
            o.keeper.shell_code() | if gave_up { RFORK_GAVE_UP } else { 0 }
        }
        Err(e) => errno(&e),
    }
}

/// Restarts the child now (operator restart). 0 or -errno.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
pub extern "C" fn rfork_restart(keeper: c_int) -> c_int {
    match with(keeper, Supervised::restart) {
        Some(Ok(())) => 0,
        Some(Err(e)) => errno(&e),
        None => -10,
    }
}

/// In a worker: tell the watchdog it is alive (one atomic add).
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
pub extern "C" fn rfork_heartbeat() {
    rfork::heartbeat()
}

/// In a worker: end now (exit(3) semantics) and be restarted from the rfork-time state.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
pub extern "C" fn rfork_request_restart() -> ! {
    rfork::request_restart()
}

/// In a worker: its generation (1 = first); 0 outside a worker.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
pub extern "C" fn rfork_generation() -> c_uint {
    rfork::generation()
}
