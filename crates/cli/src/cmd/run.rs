//! `kintsugi run`: supervise an external command (fork+exec restarts), like
//! `systemd-run -p Restart=on-failure`. The supervision logic is `rfork::command`; this module
//! turns flags into a validated policy and events into structured log lines.

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use rfork::command::{CommandError, RunConfig};
use rfork::{Backoff, EventKind, Intensity, Policy, RestartOn};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Signals: SIGHUP restarts the child now; SIGTERM/SIGINT stop it (SIGTERM to its process group, \
SIGKILL after --stop-timeout) and exit.
Watchdog: the child gets NOTIFY_SOCKET and WATCHDOG_USEC (systemd's sd_notify protocol) and must \
send WATCHDOG=1 at least every --watchdog period.
Exit status: the last child's (128+N if killed by signal N); 127 command not found; 126 not \
executable; 2 bad flags.")]
pub struct Args {
    /// When to restart: on-crash (signals, watchdog), on-failure (also non-zero exit),
    /// always (also exit 0), on-request (only SIGHUP or the request exit code).
    #[arg(long, default_value = "on-failure", value_parser = parse_restart)]
    pub restart: RestartOn,
    /// Give up after this many restarts within --within ("unlimited" for no limit).
    #[arg(long, default_value = "5", value_parser = parse_max)]
    pub max_restarts: u32,
    /// The restart-intensity window, e.g. 10s, 500ms, 2min.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub within: Duration,
    /// Kill and restart a child that sends no WATCHDOG=1 for this long.
    #[arg(long, value_parser = parse_duration)]
    pub watchdog: Option<Duration>,
    /// First delay of exponential backoff between consecutive restarts (none by default).
    #[arg(long, value_parser = parse_duration)]
    pub backoff: Option<Duration>,
    /// Cap of the backoff delay.
    #[arg(long, default_value = "30s", value_parser = parse_duration, requires = "backoff")]
    pub backoff_max: Duration,
    /// Grace between SIGTERM and SIGKILL when stopping or restarting on request.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub stop_timeout: Duration,
    /// A child exiting with this status asks for a restart ("none" to disable).
    #[arg(long, default_value = "75", value_parser = parse_request_code)]
    pub request_exit_code: RequestCode,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

fn parse_restart(s: &str) -> Result<RestartOn, String> {
    RestartOn::parse(s).ok_or_else(|| {
        format!("unknown policy {s:?}: use on-crash, on-failure, always or on-request")
    })
}

fn parse_max(s: &str) -> Result<u32, String> {
    if s == "unlimited" {
        return Ok(u32::MAX);
    }
    match s.parse::<u32>() {
        Ok(0) => {
            Err("0 restarts would never restart: use --restart on-request, or at least 1".into())
        }
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a count (or \"unlimited\")")),
    }
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 10s, 500ms or 2min: {e}"))
}

/// The restart-request exit status, or none (a newtype: clap treats a bare `Option` field as
/// "flag may be absent", not as a parsed value that may be "none").
#[derive(Debug, Clone, Copy)]
pub struct RequestCode(pub Option<i32>);

fn parse_request_code(s: &str) -> Result<RequestCode, String> {
    if s == "none" {
        return Ok(RequestCode(None));
    }
    match s.parse::<i32>() {
        Ok(0) => Err("exit status 0 means success; it cannot also mean \"restart me\"".into()),
        Ok(n @ 1..=255) => Ok(RequestCode(Some(n))),
        _ => Err(format!(
            "{s:?} is not an exit status from 1 to 255 (or \"none\")"
        )),
    }
}

/// Cross-flag checks clap cannot express.
fn config(a: &Args) -> anyhow::Result<RunConfig> {
    if a.within.is_zero() && a.max_restarts != u32::MAX {
        bail!("--within 0 makes the restart limit meaningless: give a window such as 10s");
    }
    if let Some(w) = a.watchdog
        && w < Duration::from_millis(1)
    {
        bail!("--watchdog {w:?} is shorter than 1ms: no program could keep up");
    }
    let backoff = match a.backoff {
        Some(b) if b > a.backoff_max => {
            bail!(
                "--backoff {b:?} is longer than --backoff-max {:?}",
                a.backoff_max
            )
        }
        Some(initial) => Some(Backoff {
            initial,
            max: a.backoff_max,
            factor: 2,
        }),
        None => None,
    };
    let intensity = if a.max_restarts == u32::MAX {
        Intensity::UNLIMITED
    } else {
        Intensity {
            max_restarts: a.max_restarts,
            within: a.within,
        }
    };
    Ok(RunConfig {
        policy: Policy {
            restart: a.restart,
            intensity,
            backoff,
        },
        watchdog: a.watchdog,
        stop_timeout: a.stop_timeout,
        request_exit_code: a.request_exit_code.0,
    })
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let cfg = config(&a)?;
    let (program, args) = a
        .command
        .split_first()
        .context("no command given after --")?;
    // A crash-looping child triggers one event per restart: restart lines are rate-limited
    // (burst 20, then 10/s); the next line that gets through says how many were dropped.
    let mut limiter = RateLimit::new(20.0, 10.0);
    let outcome = rfork::command::supervise(program, args, &cfg, |ev| {
        let pid = ev.pid.as_raw();
        let reason = ev.reason.to_string();
        if ev.kind == EventKind::Restarted && !limiter.allow() {
            return;
        }
        let suppressed = if ev.kind == EventKind::Restarted {
            limiter.take_suppressed()
        } else {
            0
        };
        match ev.kind {
            EventKind::Started => tracing::info!(
                event = "started",
                pid,
                generation = ev.generation,
                "child started"
            ),
            EventKind::Restarted => tracing::warn!(
                event = "restarted",
                pid,
                generation = ev.generation,
                reason,
                restarts_in_window = ev.restarts_in_window,
                suppressed,
                "child restarted"
            ),
            EventKind::Removed => tracing::info!(
                event = "removed",
                pid,
                generation = ev.generation,
                reason,
                "child ended; not restarting"
            ),
            EventKind::GaveUp => tracing::error!(
                event = "gave_up",
                pid,
                generation = ev.generation,
                reason,
                restarts_in_window = ev.restarts_in_window,
                "restarting too often; giving up"
            ),
            EventKind::StandbyReady => {}
        }
    });
    match outcome {
        Ok(o) => Ok(ExitCode::from(o.exit_code().clamp(0, 255) as u8)),
        Err(e @ CommandError::NotFound(_)) => {
            eprintln!("kintsugi: {e}");
            Ok(ExitCode::from(127))
        }
        Err(e @ CommandError::NotExecutable(_)) => {
            eprintln!("kintsugi: {e}");
            Ok(ExitCode::from(126))
        }
        Err(e) => Err(e).context("kintsugi run"),
    }
}

/// Token bucket for log lines a faulty child can trigger.
#[derive(Debug)]
struct RateLimit {
    tokens: f64,
    burst: f64,
    per_sec: f64,
    last: std::time::Instant,
    suppressed: u64,
}

impl RateLimit {
    fn new(burst: f64, per_sec: f64) -> RateLimit {
        RateLimit {
            tokens: burst,
            burst,
            per_sec,
            last: std::time::Instant::now(),
            suppressed: 0,
        }
    }

    fn allow(&mut self) -> bool {
        let now = std::time::Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.per_sec;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    fn take_suppressed(&mut self) -> u64 {
        std::mem::take(&mut self.suppressed)
    }
}

#[cfg(test)]
mod tests {
    use super::RateLimit;

    #[test]
    fn rate_limit_allows_the_burst_then_counts_what_it_drops() {
        let mut r = RateLimit::new(3.0, 0.001);
        assert_eq!((0..10).filter(|_| r.allow()).count(), 3);
        assert_eq!(r.take_suppressed(), 7);
        assert_eq!(r.take_suppressed(), 0);
    }
}
