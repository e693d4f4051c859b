//! Recovery actions: restart a supervised service (signal its `kintsugi run` supervisor), kill a
//! runaway cgroup, run a user hook. Each run is an [`ActionRecord`]; each action has a cooldown
//! so a workload that keeps faulting cannot make the monitor spin.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sys::Pid;

use crate::cgroup;
use crate::config::{self, ActionKind, glob_match};
use crate::event::{ActionRecord, Detection, FaultKind};

#[derive(Debug)]
struct RunningHook {
    child: Child,
    deadline: Instant,
    record: ActionRecord,
}

/// An in-process action: what a program embedding the monitor does about a fault, e.g.
/// `rfork::Supervised::restart` on its rforked worker. Returns what it did, or why it failed.
pub type Callback = Box<dyn FnMut(&Detection) -> Result<String, String> + Send>;

struct CallbackAction {
    name: &'static str,
    on: Vec<FaultKind>,
    cooldown: Duration,
    last: Option<Instant>,
    f: Callback,
}

impl std::fmt::Debug for CallbackAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackAction")
            .field("name", &self.name)
            .field("on", &self.on)
            .finish()
    }
}

/// The configured actions and the hooks still running.
#[derive(Debug)]
pub struct Actions {
    cfgs: Vec<config::Action>,
    last: Vec<Option<Instant>>,
    hooks: Vec<RunningHook>,
    callbacks: Vec<CallbackAction>,
}

fn kind_name(k: ActionKind) -> &'static str {
    match k {
        ActionKind::Restart => "restart",
        ActionKind::KillCgroup => "kill_cgroup",
        ActionKind::Hook => "hook",
    }
}

impl Actions {
    pub fn new(cfgs: &[config::Action]) -> Actions {
        Actions {
            cfgs: cfgs.to_vec(),
            last: vec![None; cfgs.len()],
            hooks: Vec::new(),
            callbacks: Vec::new(),
        }
    }

    /// Adds an in-process action named `name` (the `action` field of its records) for the
    /// `on` faults, run at most once per `cooldown`.
    pub fn add_callback(
        &mut self,
        name: &'static str,
        on: &[FaultKind],
        cooldown: Duration,
        f: Callback,
    ) {
        self.callbacks.push(CallbackAction {
            name,
            on: on.to_vec(),
            cooldown,
            last: None,
            f,
        });
    }

    /// Runs every action configured for `d`'s fault (outside its cooldown).
    pub fn on_detection(&mut self, d: &Detection, now: Instant, out: &mut Vec<ActionRecord>) {
        for c in &mut self.callbacks {
            if !c.on.contains(&d.fault)
                || c.last.is_some_and(|t| now.duration_since(t) < c.cooldown)
            {
                continue;
            }
            c.last = Some(now);
            let r = (c.f)(d);
            out.push(ActionRecord {
                action: c.name,
                fault: d.fault,
                subject: d.subject.clone(),
                target: "in-process".into(),
                ok: r.is_ok(),
                detail: r.unwrap_or_else(|e| e),
            });
        }
        for i in 0..self.cfgs.len() {
            let cfg = &self.cfgs[i];
            if !cfg.on.contains(&d.fault) {
                continue;
            }
            if let Some(t) = self.last[i]
                && now.duration_since(t) < Duration::from_millis(cfg.cooldown_ms)
            {
                continue;
            }
            // kill_cgroup without a target in the detection does not consume the cooldown:
            // the next detection of the same fault may name its cgroup.
            if cfg.kind == ActionKind::KillCgroup && cfg.cgroup.is_none() && d.cgroup.is_none() {
                continue;
            }
            self.last[i] = Some(now);
            let mut rec = ActionRecord {
                action: kind_name(cfg.kind),
                fault: d.fault,
                subject: d.subject.clone(),
                target: String::new(),
                ok: false,
                detail: String::new(),
            };
            match cfg.kind {
                ActionKind::Restart => restart(cfg, &mut rec),
                ActionKind::KillCgroup => kill_cgroup(cfg, d, &mut rec),
                ActionKind::Hook => {
                    if let Some(child) = spawn_hook(cfg, d, &mut rec) {
                        self.hooks.push(RunningHook {
                            child,
                            deadline: now + Duration::from_millis(cfg.timeout_ms),
                            record: rec.clone(),
                        });
                    }
                }
            }
            out.push(rec);
        }
    }

    /// Reaps finished hooks and kills those past their timeout; reports how each ended.
    pub fn reap(&mut self, now: Instant, out: &mut Vec<ActionRecord>) {
        self.hooks.retain_mut(|h| {
            let done = match h.child.try_wait() {
                Ok(Some(st)) => Some((st.success(), format!("hook exited: {st}"))),
                Ok(None) if now >= h.deadline => {
                    let _ = h.child.kill();
                    let _ = h.child.wait();
                    Some((false, "hook killed after its timeout_ms".to_string()))
                }
                Ok(None) => None,
                Err(e) => Some((false, format!("cannot wait for hook: {e}"))),
            };
            match done {
                Some((ok, detail)) => {
                    out.push(ActionRecord {
                        ok,
                        detail,
                        ..h.record.clone()
                    });
                    false
                }
                None => true,
            }
        });
    }

    /// Hooks still running.
    pub fn running(&self) -> usize {
        self.hooks.len()
    }
}

impl Drop for Actions {
    fn drop(&mut self) {
        // A hook must not outlive the monitor that bounded it.
        for h in &mut self.hooks {
            let _ = h.child.kill();
            let _ = h.child.wait();
        }
    }
}

fn restart(cfg: &config::Action, rec: &mut ActionRecord) {
    let pid = match (cfg.pid, &cfg.pid_file) {
        (Some(p), _) => Pid::from_raw(p),
        (None, Some(f)) => std::fs::read_to_string(f)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .and_then(Pid::from_raw),
        (None, None) => None,
    };
    let sig = sys::signal::parse(&cfg.signal).unwrap_or(1);
    let Some(pid) = pid else {
        rec.target = cfg
            .pid_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        rec.detail = "no supervisor pid: the pid file is missing or does not hold a pid".into();
        return;
    };
    rec.target = format!("pid {pid}");
    match sys::process::kill(pid, sig) {
        Ok(()) => {
            rec.ok = true;
            rec.detail = format!("sent {} to the supervisor", sys::signal::name(sig));
        }
        Err(e) => rec.detail = format!("cannot signal supervisor pid {pid}: {e}"),
    }
}

fn kill_cgroup(cfg: &config::Action, d: &Detection, rec: &mut ActionRecord) {
    let (cg, from_detection): (PathBuf, bool) = match (&cfg.cgroup, &d.cgroup) {
        (Some(c), _) => (c.clone(), false),
        (None, Some(c)) => (c.clone(), true),
        (None, None) => return,
    };
    rec.target = cg.display().to_string();
    if from_detection {
        let rel = cgroup::relative(&cg);
        if !cfg.allow.iter().any(|p| glob_match(p, &rel)) {
            rec.detail = format!("cgroup {rel} is not in the action's `allow` list: not killed");
            return;
        }
    }
    match cgroup::kill(&cg, Duration::from_secs(2)) {
        Ok(n) => {
            rec.ok = true;
            rec.detail = format!("{n} SIGKILLs sent; the cgroup is empty");
        }
        Err(e) => rec.detail = e.to_string(),
    }
}

fn spawn_hook(cfg: &config::Action, d: &Detection, rec: &mut ActionRecord) -> Option<Child> {
    rec.target = cfg.command.join(" ");
    let mut cmd = Command::new(&cfg.command[0]);
    cmd.args(&cfg.command[1..])
        .env("KINTSUGI_FAULT", d.fault.as_str())
        .env("KINTSUGI_SOURCE", d.source)
        .env("KINTSUGI_SUBJECT", &d.subject)
        .env("KINTSUGI_DETAIL", &d.detail)
        .env(
            "KINTSUGI_PID",
            d.pid.map(|p| p.to_string()).unwrap_or_default(),
        )
        .env(
            "KINTSUGI_CGROUP",
            d.cgroup
                .as_ref()
                .map(|c| c.display().to_string())
                .unwrap_or_default(),
        )
        .stdin(Stdio::null());
    // stdout carries the monitor's JSON lines: a hook's output goes to stderr instead.
    if let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() {
        cmd.stdout(Stdio::from(fd));
    } else {
        cmd.stdout(Stdio::null());
    }
    match cmd.spawn() {
        Ok(child) => {
            rec.ok = true;
            rec.detail = format!("hook started as pid {}", child.id());
            Some(child)
        }
        Err(e) => {
            rec.detail = format!("cannot start hook {:?}: {e}", cfg.command[0]);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(kind: ActionKind) -> config::Action {
        config::Action {
            on: vec![FaultKind::Heartbeat],
            kind,
            pid: None,
            pid_file: None,
            signal: "SIGHUP".into(),
            cgroup: None,
            allow: vec![],
            command: vec![],
            timeout_ms: 5000,
            cooldown_ms: 60_000,
        }
    }

    #[test]
    fn hook_runs_with_the_detection_in_its_environment_once_per_cooldown() {
        let dir = std::env::temp_dir().join(format!("kw-hook-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let mut a = action(ActionKind::Hook);
        a.command = vec![
            "/bin/sh".into(),
            "-c".into(),
            format!(
                "echo \"$KINTSUGI_FAULT $KINTSUGI_SUBJECT\" >> {}",
                dir.display()
            ),
        ];
        let mut acts = Actions::new(&[a]);
        let d = Detection::new(FaultKind::Heartbeat, "heartbeat", "heartbeat svc", "x");
        let mut out = Vec::new();
        let now = Instant::now();
        acts.on_detection(&d, now, &mut out);
        acts.on_detection(&d, now, &mut out);
        assert_eq!(out.len(), 1, "cooldown holds the second run");
        let t = Instant::now();
        while acts.running() > 0 && t.elapsed() < Duration::from_secs(5) {
            acts.reap(Instant::now(), &mut out);
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(out.len(), 2);
        assert!(out[1].ok, "{:?}", out[1]);
        let text = std::fs::read_to_string(&dir).unwrap();
        let _ = std::fs::remove_file(&dir);
        assert_eq!(text.trim(), "heartbeat heartbeat svc");
    }

    #[test]
    fn restart_reports_a_missing_pid_file() {
        let mut a = action(ActionKind::Restart);
        a.pid_file = Some("/nonexistent/kintsugi.pid".into());
        let mut acts = Actions::new(&[a]);
        let mut out = Vec::new();
        acts.on_detection(
            &Detection::new(FaultKind::Heartbeat, "heartbeat", "hb", ""),
            Instant::now(),
            &mut out,
        );
        assert!(!out[0].ok);
        assert!(out[0].detail.contains("pid file"));
    }

    #[test]
    fn kill_cgroup_respects_allow() {
        let mut a = action(ActionKind::KillCgroup);
        a.allow = vec!["/kintsugi-*".into()];
        let mut acts = Actions::new(&[a]);
        let mut out = Vec::new();
        let d = Detection::new(FaultKind::Heartbeat, "x", "y", "")
            .with_cgroup(Some("/sys/fs/cgroup/pids/system.slice".into()));
        acts.on_detection(&d, Instant::now(), &mut out);
        assert!(!out[0].ok);
        assert!(out[0].detail.contains("allow"));
    }
}
