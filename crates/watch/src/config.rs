//! Thresholds and actions, from a TOML file (`kintsugi watch --config FILE`) or the defaults.
//!
//! Every field has a default, so an empty file is a valid config. Unknown keys are errors: a
//! misspelt threshold silently falling back to its default would be worse than refusing to start.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::event::FaultKind;

/// Errors loading or validating a config; each names the file or key and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source} (check the path passed to --config)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Period of the one timer: D-state sweep, pids counters, heartbeat checks.
    pub tick_ms: u64,
    /// Upper bound on tasks tracked with a kept-open stat fd.
    pub max_tasks: usize,
    /// This monitor's own heartbeat: a counter rewritten here four times per tick, so a second
    /// `kintsugi watch` (a `[[heartbeat]]` on this path) can watch this one.
    pub beat_file: Option<PathBuf>,
    pub hung_task: HungTask,
    pub driver: Driver,
    pub fork: Fork,
    pub memory: Memory,
    pub kernel: Kernel,
    pub heartbeat: Vec<Heartbeat>,
    pub action: Vec<Action>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            tick_ms: 1000,
            max_tasks: 32768,
            beat_file: None,
            hung_task: HungTask::default(),
            driver: Driver::default(),
            fork: Fork::default(),
            memory: Memory::default(),
            kernel: Kernel::default(),
            heartbeat: Vec::new(),
            action: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HungTask {
    pub enabled: bool,
    /// A task in D state whose timeslice count has not moved for this long is hung. The kernel's
    /// own detector uses 120 s; 10 s catches real hangs without flagging slow disks.
    pub threshold_ms: u64,
}

impl Default for HungTask {
    fn default() -> HungTask {
        HungTask {
            enabled: true,
            threshold_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Driver {
    pub enabled: bool,
    /// Report when at least this many tasks are stuck in D state at the same kernel wait
    /// point (wchan) and their number grew since the previous sweep.
    pub min_blocked: usize,
    /// PSI `io some` trigger: stall microseconds per 2 s window that wake the monitor for an
    /// immediate sweep. 0 disables the trigger.
    pub psi_io_stall_us: u64,
}

impl Default for Driver {
    fn default() -> Driver {
        Driver {
            enabled: true,
            min_blocked: 3,
            psi_io_stall_us: 200_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fork {
    pub enabled: bool,
    /// Forks per second, machine-wide, that count as a storm.
    pub max_per_sec: u64,
    /// Forks per second by one parent process that count as a storm.
    pub max_per_sec_per_parent: u64,
}

impl Default for Fork {
    fn default() -> Fork {
        Fork {
            enabled: true,
            max_per_sec: 2000,
            max_per_sec_per_parent: 300,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Memory {
    pub enabled: bool,
    /// PSI `memory some` trigger: stall microseconds per 2 s window. 0 disables it.
    pub psi_stall_us: u64,
    /// Report when MemAvailable falls under this percentage of MemTotal. 0 disables it.
    pub min_available_pct: f64,
}

impl Default for Memory {
    fn default() -> Memory {
        Memory {
            enabled: true,
            psi_stall_us: 200_000,
            min_available_pct: 3.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Kernel {
    pub enabled: bool,
    /// Also classify lines that user space wrote into /dev/kmsg. Off by default: anyone with
    /// write access to /dev/kmsg could otherwise fake an oops and trigger actions.
    pub accept_user_messages: bool,
}

impl Default for Kernel {
    fn default() -> Kernel {
        Kernel {
            enabled: true,
            accept_user_messages: false,
        }
    }
}

/// A heartbeat: a file whose content a live service keeps changing (a counter written with
/// `pwrite`, or a shared mapping of the file). Silence longer than `timeout_ms` is a fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub name: String,
    pub path: PathBuf,
    #[serde(default = "default_heartbeat_timeout")]
    pub timeout_ms: u64,
}

fn default_heartbeat_timeout() -> u64 {
    1000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// Send `signal` (default SIGHUP) to a supervisor: `kintsugi run` restarts its child.
    Restart,
    /// Kill every process in a cgroup (`cgroup.kill` on v2, SIGKILL to each pid on v1).
    KillCgroup,
    /// Run a command with the detection in its environment (`KINTSUGI_FAULT`, …).
    Hook,
}

/// `[[action]]`: what to do when one of the `on` faults is detected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    pub on: Vec<FaultKind>,
    pub kind: ActionKind,
    /// restart: the supervisor's pid, or a file holding it.
    #[serde(default)]
    pub pid: Option<i32>,
    #[serde(default)]
    pub pid_file: Option<PathBuf>,
    /// restart: the signal to send (name or number).
    #[serde(default = "default_signal")]
    pub signal: String,
    /// kill_cgroup: a fixed cgroup directory; without it, the cgroup named by the detection.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// kill_cgroup: cgroup paths (relative to their hierarchy root, `*` matches anything) that
    /// may be killed when the target comes from a detection. Empty allows none: the monitor
    /// never kills a cgroup nobody named.
    #[serde(default)]
    pub allow: Vec<String>,
    /// hook: argv of the command.
    #[serde(default)]
    pub command: Vec<String>,
    /// hook: kill the command after this long.
    #[serde(default = "default_hook_timeout")]
    pub timeout_ms: u64,
    /// Do not run this action again within this long (a faulty workload can re-trigger it).
    #[serde(default = "default_cooldown")]
    pub cooldown_ms: u64,
}

fn default_signal() -> String {
    "SIGHUP".into()
}
fn default_hook_timeout() -> u64 {
    10_000
}
fn default_cooldown() -> u64 {
    2_000
}

impl Config {
    /// Reads and validates a TOML config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.into(),
                source,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<text>".into(),
            source: Box::new(e),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config as TOML (what `kintsugi watch --print-config` shows).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the config serializes: plain values before tables")
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !(10..=60_000).contains(&self.tick_ms) {
            return bad(format!(
                "tick_ms = {} is out of range: use 10..=60000",
                self.tick_ms
            ));
        }
        if self.driver.min_blocked == 0 {
            return bad("driver.min_blocked must be at least 1".into());
        }
        for h in &self.heartbeat {
            if h.timeout_ms < 100 {
                return bad(format!(
                    "heartbeat {:?}: timeout_ms = {} is too short: use at least 100",
                    h.name, h.timeout_ms
                ));
            }
        }
        for (i, a) in self.action.iter().enumerate() {
            if a.on.is_empty() {
                return bad(format!(
                    "action #{}: `on` is empty: list fault kinds",
                    i + 1
                ));
            }
            match a.kind {
                ActionKind::Restart => {
                    if a.pid.is_none() && a.pid_file.is_none() {
                        return bad(format!(
                            "action #{} (restart): set `pid` or `pid_file` of the supervisor",
                            i + 1
                        ));
                    }
                    if sys::signal::parse(&a.signal).is_none() {
                        return bad(format!(
                            "action #{} (restart): unknown signal {:?}",
                            i + 1,
                            a.signal
                        ));
                    }
                }
                ActionKind::KillCgroup => {
                    if a.cgroup.is_none() && a.allow.is_empty() {
                        return bad(format!(
                            "action #{} (kill_cgroup): set `cgroup`, or `allow` patterns for \
                             cgroups named by detections",
                            i + 1
                        ));
                    }
                }
                ActionKind::Hook => {
                    if a.command.is_empty() {
                        return bad(format!("action #{} (hook): `command` is empty", i + 1));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Glob match where `*` matches any run of characters (including `/`).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_text_is_the_default() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn full_config_parses() {
        let c = Config::parse(
            r#"
            tick_ms = 500
            [hung_task]
            threshold_ms = 2000
            [fork]
            max_per_sec = 100
            [[heartbeat]]
            name = "svc"
            path = "/run/svc.beat"
            [[action]]
            on = ["fork_storm", "memory"]
            kind = "kill_cgroup"
            allow = ["/kintsugi-*"]
            [[action]]
            on = ["heartbeat"]
            kind = "restart"
            pid = 42
            "#,
        )
        .unwrap();
        assert_eq!(c.tick_ms, 500);
        assert_eq!(c.hung_task.threshold_ms, 2000);
        assert_eq!(c.heartbeat[0].timeout_ms, 1000);
        assert_eq!(c.action[1].signal, "SIGHUP");
        assert_eq!(
            c.action[0].on,
            vec![FaultKind::ForkStorm, FaultKind::Memory]
        );
    }

    #[test]
    fn mistakes_are_named() {
        let e = Config::parse("[fork]\nmax_per_second = 3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_per_second"), "{e}");
        let e = Config::parse("[[action]]\non=[\"memory\"]\nkind=\"kill_cgroup\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("allow"), "{e}");
        let e = Config::parse("[[action]]\non=[\"oops\"]\nkind=\"hook\"").unwrap_err();
        assert!(e.to_string().contains("oops"), "{e}");
    }

    #[test]
    fn printed_config_parses_back() {
        let mut c = Config::default();
        c.heartbeat.push(Heartbeat {
            name: "a".into(),
            path: "/x".into(),
            timeout_ms: 500,
        });
        assert_eq!(Config::parse(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn globs() {
        assert!(glob_match("/kintsugi-*", "/kintsugi-watch-1"));
        assert!(glob_match("*", "/anything/at/all"));
        assert!(glob_match("/a/*/c", "/a/b/c"));
        assert!(!glob_match("/kintsugi-*", "/system.slice"));
        assert!(!glob_match("/a*b*c", "/abx"));
        assert!(glob_match("/exact", "/exact"));
        assert!(!glob_match("/ab*ba", "/aba"));
    }

    proptest::proptest! {
        #[test]
        fn star_matches_everything(s in "[a-z/._-]{0,20}") {
            proptest::prop_assert!(glob_match("*", &s));
            let p = format!("{s}*");
            proptest::prop_assert!(glob_match(&p, &s));
        }
    }
}
