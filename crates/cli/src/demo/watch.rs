//! Demo rung for `kintsugi watch`: a fork bomb in a pids-limited cgroup and a frozen heartbeat,
//! each detected by the monitor and answered by its action (kill the cgroup, run a hook).

use watch::event::{Event, FaultKind};

/// Runs the rung (about 4 s) and narrates through `say`. Fails if a fault went undetected or
/// the bomb's cgroup was not killed.
pub fn run(say: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
    say("== watch: detect kernel trouble from outside and recover ==");
    let events = watch::faults::demo(&mut *say)?;
    let detected = |f: FaultKind| {
        events
            .iter()
            .any(|e| matches!(e, Event::Detection { detection, .. } if detection.fault == f))
    };
    let killed = events.iter().any(|e| {
        matches!(e, Event::Action { action, .. } if action.action == "kill_cgroup" && action.ok)
    });
    anyhow::ensure!(
        detected(FaultKind::ForkStorm),
        "the fork bomb was not detected"
    );
    anyhow::ensure!(killed, "the fork bomb's cgroup was not killed");
    anyhow::ensure!(
        detected(FaultKind::Heartbeat),
        "the frozen heartbeat was not detected"
    );
    say("watch: both faults detected and acted on");
    Ok(())
}
