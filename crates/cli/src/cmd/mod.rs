//! Subcommands other than `demo` and `bench`: one module each, `Args` + `run`.

pub mod notify;
pub mod run;
pub mod watch;
pub mod fsctl;
pub mod mount;
pub mod umount;
pub mod guard;
pub mod restore;
