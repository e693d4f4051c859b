//! The fault matrix, run for both designs: clean exit, non-zero exit, panic, SIGSEGV, SIGKILL
//! from outside, restart request, hang caught by the watchdog, crash loop hitting the
//! intensity limit. Every test is bounded (events are awaited with timeouts) and proves it left
//! nothing behind: the keeper and every worker are reaped and the test process has no child.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rfork::{Config, Design, EventKind, Intensity, Policy, Reason, RestartOn, Supervised, Worker};
use sys::Pid;

const T: Duration = Duration::from_secs(20);

fn cfg(design: Design, restart: RestartOn) -> Config {
    Config {
        design,
        policy: Policy {
            restart,
            intensity: Intensity {
                max_restarts: 10,
                within: Duration::from_secs(60),
            },
            backoff: None,
        },
        ..Config::default()
    }
}

/// Reads events until supervision ends; returns (kind, reason) pairs (without StandbyReady)
/// and every worker pid seen.
fn collect(mut s: Supervised) -> (Vec<(EventKind, Reason)>, Vec<Pid>, rfork::Outcome) {
    let keeper = s.keeper_pid();
    let mut seen = Vec::new();
    let mut pids = vec![keeper];
    loop {
        let ev = s
            .next_event(Some(T))
            .expect("event stream")
            .unwrap_or_else(|| {
                if s.events().is_closed() {
                    panic!("stream closed without a final event; seen {seen:?}")
                }
                panic!("no event within {T:?}; seen so far {seen:?}")
            });
        pids.push(ev.pid);
        if ev.kind == EventKind::StandbyReady {
            continue;
        }
        seen.push((ev.kind, ev.reason));
        if matches!(ev.kind, EventKind::Removed | EventKind::GaveUp) {
            break;
        }
    }
    let outcome = s.wait().expect("wait");
    testkit::assert_all_gone(&pids, Duration::from_secs(5));
    testkit::assert_no_children(Duration::from_secs(5));
    testkit::assert_no_orphans_of_this_exe(Duration::from_secs(5));
    (seen, pids, outcome)
}

fn run(
    cfg: Config,
    f: impl FnOnce(&Worker) -> i32,
) -> (Vec<(EventKind, Reason)>, Vec<Pid>, rfork::Outcome) {
    collect(rfork::spawn(&cfg, f).expect("rfork"))
}

use EventKind::{GaveUp, Removed, Restarted, Started};

macro_rules! both_designs {
    ($($name:ident => $body:expr;)*) => {
        mod monitor { use super::*; $( #[test] fn $name() { ($body)(Design::Monitor) } )* }
        mod kept_image { use super::*; $( #[test] fn $name() { ($body)(Design::KeptImage) } )* }
    };
}

both_designs! {
    clean_exit_removes_the_child => |d| {
        let (ev, _, out) = run(cfg(d, RestartOn::OnFailure), |_| 0);
        assert_eq!(ev, [(Started, Reason::None), (Removed, Reason::Exited(0))]);
        assert_eq!(out.keeper, sys::process::ExitStatus::Exited(0));
    };
    nonzero_exit_restarts_under_on_failure => |d| {
        let (ev, _, _) = run(cfg(d, RestartOn::OnFailure), |w| if w.generation() < 3 { 3 } else { 0 });
        assert_eq!(ev, [(Started, Reason::None), (Restarted, Reason::Exited(3)), (Restarted, Reason::Exited(3)),
                        (Removed, Reason::Exited(0))]);
    };
    nonzero_exit_removes_under_on_crash => |d| {
        let (ev, _, out) = run(cfg(d, RestartOn::OnCrash), |_| 3);
        assert_eq!(ev, [(Started, Reason::None), (Removed, Reason::Exited(3))]);
        assert_eq!(out.keeper, sys::process::ExitStatus::Exited(3));
    };
    panic_is_a_crash_and_restarts => |d| {
        let (ev, _, _) = run(cfg(d, RestartOn::OnCrash), |w| if w.generation() == 1 { panic!("injected") } else { 0 });
        assert_eq!(ev, [(Started, Reason::None), (Restarted, Reason::Signaled(libc::SIGABRT)), (Removed, Reason::Exited(0))]);
    };
    segv_restarts => |d| {
        let (ev, _, _) = run(cfg(d, RestartOn::OnCrash), |w| if w.generation() == 1 { sys::fault::segv() } else { 0 });
        assert_eq!(ev, [(Started, Reason::None), (Restarted, Reason::Signaled(libc::SIGSEGV)), (Removed, Reason::Exited(0))]);
    };
    cpu_faults_restart => |d| {
        let (ev, _, _) = run(cfg(d, RestartOn::OnCrash), |w| match w.generation() {
            1 => sys::fault::ill(),
            2 => sys::fault::fpe(),
            3 => sys::fault::bus(),
            _ => 0,
        });
        assert_eq!(ev, [(Started, Reason::None), (Restarted, Reason::Signaled(libc::SIGILL)),
                        (Restarted, Reason::Signaled(libc::SIGFPE)), (Restarted, Reason::Signaled(libc::SIGBUS)),
                        (Removed, Reason::Exited(0))]);
    };
    sigkill_from_outside_restarts => |d| {
        let mut s = rfork::spawn(&cfg(d, RestartOn::OnCrash), |w| {
            if w.generation() == 1 { loop { std::thread::sleep(Duration::from_secs(1)) } }
            0
        }).expect("rfork");
        let first = s.next_event(Some(T)).expect("events").expect("started");
        assert_eq!(first.kind, Started);
        sys::process::kill(first.pid, libc::SIGKILL).expect("kill worker");
        let (ev, _, _) = collect(s);
        assert!(ev.contains(&(Restarted, Reason::Signaled(libc::SIGKILL))), "{ev:?}");
        assert_eq!(ev.last(), Some(&(Removed, Reason::Exited(0))));
    };
    restart_request_restarts_even_under_on_request => |d| {
        let (ev, _, _) = run(cfg(d, RestartOn::OnRequest), |w| if w.generation() == 1 { w.request_restart() } else { 0 });
        assert_eq!(ev, [(Started, Reason::None), (Restarted, Reason::Requested), (Removed, Reason::Exited(0))]);
    };
    free_function_restart_request_works => |d| {
        let (ev, _, _) = run(cfg(d, RestartOn::OnRequest), |_| if rfork::generation() == 1 { rfork::request_restart() } else { 0 });
        assert_eq!(ev, [(Started, Reason::None), (Restarted, Reason::Requested), (Removed, Reason::Exited(0))]);
    };
    hang_is_caught_by_the_watchdog => |d| {
        let c = Config { watchdog: Some(Duration::from_millis(200)), ..cfg(d, RestartOn::OnFailure) };
        let (ev, _, _) = run(c, |w| {
            if w.generation() == 1 {
                for _ in 0..5 { w.heartbeat(); std::thread::sleep(Duration::from_millis(20)); }
                loop { std::thread::sleep(Duration::from_secs(1)) } // hang: no more heartbeats
            }
            0
        });
        assert_eq!(ev, [(Started, Reason::None), (Restarted, Reason::Hung), (Removed, Reason::Exited(0))]);
    };
    heartbeating_worker_is_left_alone => |d| {
        // A generous period: the test asserts "not restarted", and a loaded CI machine can stall
        // a process for tens of milliseconds.
        let c = Config { watchdog: Some(Duration::from_millis(600)), ..cfg(d, RestartOn::OnFailure) };
        let (ev, _, _) = run(c, |w| {
            for _ in 0..40 { w.heartbeat(); std::thread::sleep(Duration::from_millis(10)); }
            0
        });
        assert_eq!(ev, [(Started, Reason::None), (Removed, Reason::Exited(0))]);
    };
    crash_loop_hits_the_intensity_limit => |d| {
        let c = Config { policy: Policy { restart: RestartOn::OnFailure,
            intensity: Intensity { max_restarts: 3, within: Duration::from_secs(30) }, backoff: None }, ..cfg(d, RestartOn::OnFailure) };
        let (ev, _, out) = run(c, |_| sys::fault::segv());
        let segv = Reason::Signaled(libc::SIGSEGV);
        assert_eq!(ev, [(Started, Reason::None), (Restarted, segv), (Restarted, segv), (Restarted, segv), (GaveUp, segv)]);
        assert!(out.gave_up());
    };
    every_restart_starts_from_the_rfork_time_state => |d| {
        let mut state = vec![1u64, 2, 3];
        let c = cfg(d, RestartOn::OnCrash);
        let (ev, _, _) = run(c, move |w| {
            if state != [1, 2, 3] { return 9; } // a later generation saw a predecessor's change
            state.push(w.generation() as u64);
            if w.generation() < 3 { sys::fault::segv() }
            0
        });
        assert_eq!(ev.last(), Some(&(Removed, Reason::Exited(0))), "{ev:?}");
        assert_eq!(ev.len(), 4);
    };
    operator_restart_and_shutdown => |d| {
        let mut s = rfork::spawn(&cfg(d, RestartOn::OnCrash), |_| loop { std::thread::sleep(Duration::from_secs(1)) })
            .expect("rfork");
        let first = s.next_event(Some(T)).expect("events").expect("started");
        s.restart().expect("restart");
        let second = loop {
            let e = s.next_event(Some(T)).expect("events").expect("restarted");
            if e.kind != EventKind::StandbyReady { break e; }
        };
        assert_eq!((second.kind, second.reason), (Restarted, Reason::Operator));
        assert_ne!(second.pid, first.pid);
        let out = s.shutdown().expect("shutdown");
        assert_eq!(out.last.map(|e| e.kind), Some(Removed));
        testkit::assert_all_gone(&[first.pid, second.pid], Duration::from_secs(5));
        testkit::assert_no_children(Duration::from_secs(5));
    };
    notify_signal_reaches_the_parent => |d| {
        let flag = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(libc::SIGUSR1, flag.clone()).expect("handler");
        let c = Config { notify_signal: Some(libc::SIGUSR1), ..cfg(d, RestartOn::OnCrash) };
        let (ev, _, _) = run(c, |w| if w.generation() == 1 { sys::fault::segv() } else { 0 });
        assert_eq!(ev.len(), 3);
        assert!(testkit::wait_until(Duration::from_secs(5), || flag.load(Ordering::SeqCst)), "no SIGUSR1 arrived");
    };
    programs_own_sigchld_keeps_working_in_the_child => |d| {
        // The worker installs its own SIGCHLD handler and forks: it must see SIGCHLD.
        let (ev, _, _) = run(cfg(d, RestartOn::OnCrash), |_| {
            let flag = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(libc::SIGCHLD, flag.clone()).expect("handler");
            match sys::process::fork().expect("fork") {
                sys::process::Fork::Child => sys::process::exit_now(0),
                sys::process::Fork::Parent(p) => {
                    sys::process::wait_pid(p).expect("wait");
                    if flag.load(Ordering::SeqCst) { 0 } else { 7 }
                }
            }
        });
        assert_eq!(ev, [(Started, Reason::None), (Removed, Reason::Exited(0))]);
    };
    dropping_the_handle_kills_the_tree => |d| {
        let mut s = rfork::spawn(&cfg(d, RestartOn::OnCrash), |_| loop { std::thread::sleep(Duration::from_secs(1)) })
            .expect("rfork");
        let keeper = s.keeper_pid();
        let first = s.next_event(Some(T)).expect("events").expect("started");
        drop(s);
        testkit::assert_all_gone(&[keeper, first.pid], Duration::from_secs(5));
        testkit::assert_no_orphans_of_this_exe(Duration::from_secs(5));
    };
}

#[test]
fn parents_sigchld_handler_sees_the_keeper_end() {
    let flag = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(libc::SIGCHLD, flag.clone()).expect("handler");
    let s = rfork::spawn(&cfg(Design::Monitor, RestartOn::OnCrash), |_| 0).expect("rfork");
    let out = s.wait().expect("wait");
    assert_eq!(out.keeper, sys::process::ExitStatus::Exited(0));
    assert!(
        flag.load(Ordering::SeqCst),
        "the parent's own SIGCHLD handler did not run"
    );
}

#[test]
fn bad_configs_are_refused_with_a_reason() {
    let mut c = Config {
        watchdog: Some(Duration::from_micros(10)),
        ..Config::default()
    };
    assert!(
        rfork::rfork(&c)
            .unwrap_err()
            .to_string()
            .contains("watchdog")
    );
    c.watchdog = None;
    c.notify_signal = Some(libc::SIGKILL);
    assert!(
        rfork::rfork(&c)
            .unwrap_err()
            .to_string()
            .contains("notify signal")
    );
    c.notify_signal = None;
    c.policy.intensity = Intensity {
        max_restarts: 3,
        within: Duration::ZERO,
    };
    assert!(rfork::rfork(&c).unwrap_err().to_string().contains("window"));
}

#[test]
fn kept_image_standby_is_parked_and_released() {
    // Proves the kept-image design really pre-forks: the worker sees a parked standby, and
    // the restarted worker's pid is the standby announced before the crash.
    let c = cfg(Design::KeptImage, RestartOn::OnCrash);
    let mut s = rfork::spawn(&c, |w| {
        if !w.wait_standby_ready(Duration::from_secs(10)) {
            return 8;
        }
        if w.generation() == 1 {
            sys::fault::segv()
        }
        0
    })
    .expect("rfork");
    let mut standby = None;
    let mut restarted = None;
    while let Some(e) = s.next_event(Some(T)).expect("events") {
        match e.kind {
            EventKind::StandbyReady if restarted.is_none() => standby = Some(e.pid),
            EventKind::Restarted => restarted = Some(e.pid),
            EventKind::Removed => assert_eq!(e.reason, Reason::Exited(0)),
            _ => {}
        }
    }
    assert_eq!(
        restarted, standby,
        "the restarted worker must be the pre-forked standby"
    );
    s.wait().expect("wait");
    testkit::assert_no_children(Duration::from_secs(5));
}

#[test]
fn a_parent_that_never_reads_events_does_not_stall_supervision() {
    // 1,500 immediate crashes: far more events than the socket holds. The parent reads none of
    // them until the end; supervision must go on regardless, and the final event must arrive.
    const N: u64 = 1500;
    let shared = sys::shm::SharedAtomics::new(1).expect("shared word");
    let c = Config {
        policy: Policy {
            restart: RestartOn::OnCrash,
            intensity: Intensity::UNLIMITED,
            backoff: None,
        },
        ..Config::default()
    };
    let s = rfork::spawn(&c, |w| {
        shared
            .word(0)
            .store(u64::from(w.generation()), Ordering::Relaxed);
        if u64::from(w.generation()) < N {
            let _ = sys::process::raise(libc::SIGKILL);
        }
        0
    })
    .expect("rfork");
    assert!(
        testkit::wait_until(Duration::from_secs(60), || shared
            .word(0)
            .load(Ordering::Relaxed)
            >= N),
        "supervision stalled at generation {} while nobody read events",
        shared.word(0).load(Ordering::Relaxed)
    );
    let dropped = s.dropped_events();
    let out = s.wait().expect("wait");
    assert!(
        dropped > 0,
        "expected the socket to overflow (test too small?)"
    );
    assert_eq!(
        out.last.map(|e| (e.kind, e.reason)),
        Some((Removed, Reason::Exited(0)))
    );
    testkit::assert_no_children(Duration::from_secs(5));
}
