//! The fault sites compiled into SMFS (issue 6's injection campaign).

use fsapi::Site;

/// Every site, by id (dense from 1).
pub static SITES: &[Site] = &[];
