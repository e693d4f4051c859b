//! Subcommands other than `demo` and `bench`: one module each, `Args` + `run`.

pub mod fsck;
pub mod fsctl;
pub mod guard;
pub mod mount;
pub mod notify;
pub mod restore;
pub mod run;
pub mod snfs_server;
pub mod umount;
pub mod watch;
