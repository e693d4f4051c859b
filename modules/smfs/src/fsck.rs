//! `fsck`: the read-only whole-structure check.

use fsapi::{FsResult, FsckProblem, Pm};

pub(crate) fn check(_pm: &mut dyn Pm) -> FsResult<Vec<FsckProblem>> {
    Ok(Vec::new())
}
