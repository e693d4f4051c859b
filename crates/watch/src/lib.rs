//! `kintsugi watch`: detect kernel trouble from outside the affected workload and trigger
//! recovery (seed 003, Orthros' monitor, rebuilt event-driven for Linux).
//!
//! Orthros polls the watched kernel at a fixed interval (48 % of a core at 10 ms). Here every
//! fault class the kernel can announce arrives as an event on one epoll set — PSI triggers,
//! the netlink proc connector, `/dev/kmsg`, v1 memcg OOM eventfds — and one 1 s timer covers
//! what it cannot announce: a D-state sweep over kept-open `/proc/.../stat` fds, pids-limit
//! counters, MemAvailable and heartbeats. See `docs/watch.md` for the measured cost.
//!
//! - [`monitor::Monitor`]: the event loop; [`detect`]: the detectors behind one trait
//!   ([`detect::Detector`]); [`action::Actions`]: restart / kill a cgroup / run a hook.
//! - [`config::Config`]: thresholds and actions (TOML), with defaults.
//! - [`event::Event`]: every detection and action as a JSON line, counted in
//!   [`event::Metrics`].
//! - [`health`]: the one-shot health table of `kintsugi watch --once`.
//! - [`faults`]: safe, bounded reproductions of each fault (used by tests, bench and demo);
//!   [`poller`]: the plain /proc polling scanner the benchmark compares against.
#![forbid(unsafe_code)]

pub mod action;
pub mod bench;
pub mod cgroup;
pub mod config;
pub mod detect;
pub mod event;
pub mod faults;
pub mod health;
pub mod kmsg;
pub mod monitor;
pub mod poller;
pub mod psi;
pub mod tasks;

pub use config::Config;
pub use event::{Detection, Event, FaultKind};
pub use monitor::{Monitor, RunOptions, RunStats, WatchError};
