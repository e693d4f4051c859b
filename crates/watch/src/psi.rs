//! PSI triggers: the kernel wakes us (POLLPRI) when stall time in a window passes a threshold.
//!
//! Without CAP_SYS_RESOURCE (the case on this machine) the window must be a multiple of 2 s and
//! unprivileged system-wide triggers fire spuriously in their first windows (research/monitor.md
//! §2.1), so every event is checked against the `total=` growth read from the same fd, and
//! events in the first two windows are dropped.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::{Duration, Instant};

/// A pressure resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Io,
    Memory,
}

impl Resource {
    pub fn path(self) -> &'static str {
        match self {
            Resource::Io => "/proc/pressure/io",
            Resource::Memory => "/proc/pressure/memory",
        }
    }
}

/// Parsed `some` line of a pressure file.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Pressure {
    pub avg10: f64,
    pub total_us: u64,
}

/// Parses the `some` line of a pressure file.
pub fn parse_some(text: &str) -> Option<Pressure> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    let mut p = Pressure::default();
    for kv in line.split_whitespace().skip(1) {
        match kv.split_once('=')? {
            ("avg10", v) => p.avg10 = v.parse().ok()?,
            ("total", v) => p.total_us = v.parse().ok()?,
            _ => {}
        }
    }
    Some(p)
}

/// Reads a pressure file once (for summaries and `--once`).
pub fn read(resource: Resource) -> Option<Pressure> {
    parse_some(&std::fs::read_to_string(resource.path()).ok()?)
}

/// An armed `some <stall> <window>` trigger.
#[derive(Debug)]
pub struct Trigger {
    pub resource: Resource,
    file: File,
    threshold_us: u64,
    window: Duration,
    armed_at: Instant,
    last_total: u64,
}

impl Trigger {
    /// The window every trigger uses: the shortest an unprivileged opener may ask for.
    pub const WINDOW: Duration = Duration::from_secs(2);

    pub fn open(resource: Resource, threshold_us: u64) -> io::Result<Trigger> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(resource.path())?;
        let window_us = Self::WINDOW.as_micros() as u64;
        let threshold_us = threshold_us.clamp(1, window_us);
        file.write_all(format!("some {threshold_us} {window_us}\0").as_bytes())?;
        let mut t = Trigger {
            resource,
            file,
            threshold_us,
            window: Self::WINDOW,
            armed_at: Instant::now(),
            last_total: 0,
        };
        t.last_total = t.current().map(|p| p.total_us).unwrap_or(0);
        Ok(t)
    }

    /// Current pressure, read through the trigger's own fd.
    pub fn current(&self) -> Option<Pressure> {
        let mut buf = [0u8; 256];
        let n = self.file.read_at(&mut buf, 0).ok()?;
        parse_some(std::str::from_utf8(&buf[..n]).ok()?)
    }

    /// Called when the fd polls POLLPRI. Returns the confirmed stall (µs since the previous
    /// confirmed event) or `None` for a spurious wakeup.
    pub fn confirm(&mut self, now: Instant) -> Option<u64> {
        let p = self.current()?;
        let grown = p.total_us.saturating_sub(self.last_total);
        self.last_total = p.total_us;
        if now.duration_since(self.armed_at) < 2 * self.window {
            return None;
        }
        (grown >= self.threshold_us).then_some(grown)
    }
}

impl AsFd for Trigger {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pressure_files() {
        let p = parse_some(
            "some avg10=1.50 avg60=0.20 avg300=0.00 total=12345\n\
             full avg10=0.00 avg60=0.00 avg300=0.00 total=10\n",
        )
        .unwrap();
        assert_eq!(p.avg10, 1.5);
        assert_eq!(p.total_us, 12345);
        assert!(parse_some("full avg10=0 total=1").is_none());
    }

    #[test]
    fn trigger_arms_on_this_kernel() {
        let t = Trigger::open(Resource::Io, 100_000).expect("PSI trigger (needs psi=1)");
        assert!(t.current().is_some());
    }
}
