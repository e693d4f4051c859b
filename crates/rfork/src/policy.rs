//! Restart policy: what to do when a worker ends, and when to stop trying.
//!
//! The decision is a pure function of (policy, how the worker ended, restart history), kept
//! apart from processes so it can be tested exhaustively. Both rfork designs and
//! `kintsugi run` feed it the same facts and obey the same answers.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use sys::process::ExitStatus;

/// Which endings lead to a restart. Whatever the policy, an explicit restart request
/// (`rfork::request_restart()`) and an operator's restart always restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestartOn {
    /// Death by signal, or a watchdog kill (the paper's "error detected by the kernel").
    /// A non-zero exit removes the worker.
    OnCrash,
    /// Crash, watchdog kill, or non-zero exit (systemd's `Restart=on-failure`).
    #[default]
    OnFailure,
    /// Every ending, even exit status 0 (systemd's `Restart=always`).
    Always,
    /// Only explicit restart requests; any other ending removes the worker.
    OnRequest,
}

impl RestartOn {
    /// Parses the CLI spelling: `on-crash`, `on-failure`, `always`, `on-request`.
    pub fn parse(s: &str) -> Option<RestartOn> {
        Some(match s {
            "on-crash" => RestartOn::OnCrash,
            "on-failure" => RestartOn::OnFailure,
            "always" => RestartOn::Always,
            "on-request" => RestartOn::OnRequest,
            _ => return None,
        })
    }
}

/// At most `max_restarts` restarts within any window of length `within` (OTP's restart
/// intensity, systemd's `StartLimitBurst`/`StartLimitIntervalSec`). One more ⇒ give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intensity {
    pub max_restarts: u32,
    pub within: Duration,
}

impl Intensity {
    /// No limit at all (benchmarks, or callers that supervise the supervisor themselves).
    pub const UNLIMITED: Intensity = Intensity {
        max_restarts: u32::MAX,
        within: Duration::ZERO,
    };
}

impl Default for Intensity {
    /// 5 restarts in 10 s, the numbers systemd and OTP use by default.
    fn default() -> Self {
        Intensity {
            max_restarts: 5,
            within: Duration::from_secs(10),
        }
    }
}

/// Exponential backoff between consecutive restarts: `initial`, ×`factor` each time, capped
/// at `max`. A worker that stays up longer than `max` resets the sequence: it was healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub factor: u32,
}

/// The whole restart policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policy {
    pub restart: RestartOn,
    pub intensity: Intensity,
    pub backoff: Option<Backoff>,
}

/// Why a worker ended, as the supervisor saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The worker asked for a restart (`request_restart`).
    Requested,
    /// The watchdog saw no heartbeat in time and killed it.
    Hung,
    /// The supervisor's owner asked for a restart (`Supervised::restart`, SIGHUP to `run`).
    Operator,
    /// It exited or died on its own.
    Status(ExitStatus),
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ending::Requested => f.write_str("restart requested by the worker"),
            Ending::Hung => f.write_str("no heartbeat within the watchdog period (killed)"),
            Ending::Operator => f.write_str("restart requested by the operator"),
            Ending::Status(s) => s.fmt(f),
        }
    }
}

/// What to do about an ending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start the next generation after `delay` (zero without backoff).
    Restart { delay: Duration },
    /// The worker is done; remove it and report its ending.
    Remove,
    /// Restarts came too fast: stop and report.
    GiveUp,
}

/// Applies a [`Policy`] to a sequence of endings. Time is passed in (nanoseconds on any
/// monotonic clock) so tests can drive it without sleeping.
#[derive(Debug, Clone)]
pub struct Governor {
    policy: Policy,
    recent: VecDeque<u64>,
    consecutive: u32,
}

impl Governor {
    pub fn new(policy: Policy) -> Governor {
        Governor {
            policy,
            recent: VecDeque::new(),
            consecutive: 0,
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Restarts inside the current intensity window (for reports).
    pub fn restarts_in_window(&self) -> u32 {
        self.recent.len() as u32
    }

    /// Decides what follows `ending` of a worker that ran for `lived` and ended at `now_ns`.
    pub fn decide(&mut self, ending: Ending, lived: Duration, now_ns: u64) -> Decision {
        if !self.wants_restart(ending) {
            return Decision::Remove;
        }
        let Intensity {
            max_restarts,
            within,
        } = self.policy.intensity;
        if max_restarts != u32::MAX {
            let within_ns = within.as_nanos() as u64;
            // A restart at t is inside the window until t + within (`now - within` would
            // saturate at 0 early on and wrongly expire a restart made at time 0).
            while self
                .recent
                .front()
                .is_some_and(|&t| t.saturating_add(within_ns) <= now_ns)
            {
                self.recent.pop_front();
            }
            if self.recent.len() as u32 >= max_restarts {
                return Decision::GiveUp;
            }
            self.recent.push_back(now_ns);
        }
        Decision::Restart {
            delay: self.next_delay(lived),
        }
    }

    fn wants_restart(&self, ending: Ending) -> bool {
        match ending {
            Ending::Requested | Ending::Operator => true,
            Ending::Hung | Ending::Status(ExitStatus::Signaled { .. }) => {
                self.policy.restart != RestartOn::OnRequest
            }
            Ending::Status(ExitStatus::Exited(0)) => self.policy.restart == RestartOn::Always,
            Ending::Status(ExitStatus::Exited(_)) => {
                matches!(
                    self.policy.restart,
                    RestartOn::OnFailure | RestartOn::Always
                )
            }
        }
    }

    fn next_delay(&mut self, lived: Duration) -> Duration {
        let Some(b) = self.policy.backoff else {
            return Duration::ZERO;
        };
        if lived > b.max {
            self.consecutive = 0;
        }
        let exp = self.consecutive.min(31);
        self.consecutive = self.consecutive.saturating_add(1);
        let factor = u64::from(b.factor.max(1)).saturating_pow(exp);
        let nanos = (b.initial.as_nanos() as u64).saturating_mul(factor);
        Duration::from_nanos(nanos).min(b.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEGV: Ending = Ending::Status(ExitStatus::Signaled {
        signal: libc::SIGSEGV,
        core: false,
    });
    const OK: Ending = Ending::Status(ExitStatus::Exited(0));
    const FAIL: Ending = Ending::Status(ExitStatus::Exited(3));
    const S: u64 = 1_000_000_000;

    fn gov(restart: RestartOn) -> Governor {
        Governor::new(Policy {
            restart,
            intensity: Intensity::UNLIMITED,
            backoff: None,
        })
    }

    #[test]
    fn endings_by_policy() {
        use Decision::*;
        let r = Restart {
            delay: Duration::ZERO,
        };
        let table = [
            (RestartOn::OnCrash, [r, Remove, Remove, r, r, r]),
            (RestartOn::OnFailure, [r, Remove, r, r, r, r]),
            (RestartOn::Always, [r, r, r, r, r, r]),
            (RestartOn::OnRequest, [Remove, Remove, Remove, r, Remove, r]),
        ];
        for (policy, want) in table {
            let endings = [
                SEGV,
                OK,
                FAIL,
                Ending::Requested,
                Ending::Hung,
                Ending::Operator,
            ];
            for (ending, want) in endings.into_iter().zip(want) {
                assert_eq!(
                    gov(policy).decide(ending, Duration::ZERO, 0),
                    want,
                    "{policy:?} {ending}"
                );
            }
        }
    }

    #[test]
    fn intensity_gives_up_on_the_restart_past_the_limit_and_forgets_old_ones() {
        let mut g = Governor::new(Policy {
            restart: RestartOn::OnFailure,
            intensity: Intensity {
                max_restarts: 3,
                within: Duration::from_secs(10),
            },
            backoff: None,
        });
        for i in 0..3 {
            assert!(matches!(
                g.decide(SEGV, Duration::ZERO, i * S),
                Decision::Restart { .. }
            ));
        }
        assert_eq!(g.decide(SEGV, Duration::ZERO, 3 * S), Decision::GiveUp);
        // 10 s after the first restart it has left the window: one more is allowed.
        assert!(matches!(
            g.decide(SEGV, Duration::ZERO, 10 * S),
            Decision::Restart { .. }
        ));
    }

    #[test]
    fn backoff_grows_caps_and_resets_after_a_healthy_run() {
        let b = Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(50),
            factor: 2,
        };
        let mut g = Governor::new(Policy {
            restart: RestartOn::OnFailure,
            intensity: Intensity::UNLIMITED,
            backoff: Some(b),
        });
        let delays: Vec<_> = (0..5)
            .map(|_| match g.decide(SEGV, Duration::ZERO, 0) {
                Decision::Restart { delay } => delay.as_millis(),
                d => panic!("{d:?}"),
            })
            .collect();
        assert_eq!(delays, [10, 20, 40, 50, 50]);
        let after_healthy = g.decide(SEGV, Duration::from_secs(1), 0);
        assert_eq!(
            after_healthy,
            Decision::Restart {
                delay: Duration::from_millis(10)
            }
        );
    }

    proptest::proptest! {
        /// Whatever the sequence, no window of `within` ever holds more than `max` restarts.
        #[test]
        fn never_more_than_max_restarts_in_any_window(
            gaps in proptest::collection::vec(0u64..3_000, 1..200),
            max in 1u32..10,
            within_ms in 1u64..5_000,
        ) {
            let within = Duration::from_millis(within_ms);
            let mut g = Governor::new(Policy {
                restart: RestartOn::Always,
                intensity: Intensity { max_restarts: max, within },
                backoff: None,
            });
            let mut now = 0u64;
            let mut restarts = Vec::new();
            for gap in gaps {
                now += gap * 1_000_000;
                if let Decision::Restart { .. } = g.decide(SEGV, Duration::ZERO, now) {
                    restarts.push(now);
                }
            }
            for (i, &t) in restarts.iter().enumerate() {
                let in_window = restarts[i..].iter().take_while(|&&u| u < t + within.as_nanos() as u64).count();
                proptest::prop_assert!(in_window as u32 <= max);
            }
        }
    }
}
