//! The fault sites compiled into SMFS (issue 6's injection campaign).
//!
//! Each site is a `pm.site(ID)` test in `lib.rs`: armed, the code takes the faulty variant the
//! G-SWIFT operator describes at that spot (a missing call, a wrong value, …); for the two
//! memory kinds the host corrupts the module's memory at that point instead. Ids are stable
//! and dense from 1; `what` names the upcall (or helper) and what goes wrong.

use fsapi::SiteKind::*;
use fsapi::{Site, SiteKind};

const fn site(id: u32, kind: SiteKind, what: &'static str) -> Site {
    Site { id, kind, what }
}

/// Every site, by id.
pub static SITES: &[Site] = &[
    site(
        1,
        MissingCall,
        "write: the inode (size, block pointers) is not written back (iput missing) (MissingCall)",
    ),
    site(
        2,
        MissingCall,
        "unlink/rmdir: the directory entry is not cleared (clear_slot missing) (MissingCall)",
    ),
    site(
        3,
        MissingCall,
        "ifree: the inode's blocks are not freed (trunc_blocks missing) (MissingCall)",
    ),
    site(
        4,
        MissingCall,
        "ialloc: the superblock is not written back (write_super missing) (MissingCall)",
    ),
    site(
        5,
        MissingCall,
        "release: the node reference is not dropped (vrele missing) (MissingCall)",
    ),
    site(
        6,
        MissingCall,
        "create/mknod/mkdir/symlink: the parent directory inode is not written back (iput missing) (MissingCall)",
    ),
    site(
        7,
        MissingCall,
        "trunc (truncate/ifree): a block is dropped from the tree but not freed (free_blk missing) (MissingCall)",
    ),
    site(
        8,
        MissingCall,
        "link: the raised link count is not written back (iput missing) (MissingCall)",
    ),
    site(
        9,
        MissingCall,
        "create: no node reference is taken for the opened file (vref missing) (MissingCall)",
    ),
    site(
        10,
        MissingInit,
        "ialloc: owner, times and generation of the new inode left at their defaults (MissingInit)",
    ),
    site(
        11,
        MissingInit,
        "dir_find/readdir (scan_dir): the \"block loaded\" marker starts at 0, so the first entry block is never read (MissingInit)",
    ),
    site(
        12,
        MissingInit,
        "bmap: the root pointer is used uninitialized (0) instead of read from the inode (MissingInit)",
    ),
    site(
        13,
        MissingInit,
        "create/mknod/mkdir/symlink: the caller's credentials are left at their default (root) (MissingInit)",
    ),
    site(
        14,
        MissingInit,
        "setattr: the timestamp \"now\" is left at its default (epoch) (MissingInit)",
    ),
    site(
        15,
        MissingAssign,
        "write: the size is not updated after an extending write (MissingAssign)",
    ),
    site(
        16,
        MissingAssign,
        "rmdir: the parent's link count is not decremented (MissingAssign)",
    ),
    site(
        17,
        MissingAssign,
        "unlink/rmdir/rename (drop_link): the link count is not decremented (MissingAssign)",
    ),
    site(
        18,
        WrongValue,
        "rmdir/rename (drop_link): a removed directory keeps one link (minus 1 instead of all) (WrongValue)",
    ),
    site(
        19,
        MissingAssign,
        "bmap: a new root block is not recorded in the inode's pointers (MissingAssign)",
    ),
    site(
        20,
        MissingAssign,
        "dir_add: the directory size is not grown for an appended entry (MissingAssign)",
    ),
    site(
        21,
        WrongValue,
        "dir_add: the grown directory size is one entry short (WrongValue)",
    ),
    site(
        22,
        WrongBranch,
        "dir_add: the \"appended a slot\" test is inverted (size changes on reuse, not on append) (WrongBranch)",
    ),
    site(
        23,
        MissingAssign,
        "rename: a moved directory's parent (rdev) is not updated (MissingAssign)",
    ),
    site(
        24,
        MissingAssign,
        "alloc_blk: the inode's block count is not raised (MissingAssign)",
    ),
    site(
        25,
        MissingAssign,
        "mknod: the device number is not stored (MissingAssign)",
    ),
    site(
        26,
        MissingIf,
        "create/mknod/mkdir/symlink: the \"name exists\" check (EEXIST) is missing (MissingIf)",
    ),
    site(
        27,
        MissingIf,
        "rmdir: the \"directory not empty\" check (ENOTEMPTY) is missing (MissingIf)",
    ),
    site(
        28,
        MissingIf,
        "truncate (set_size): shrinking frees nor zeroes nothing (the \"size < old size\" branch is missing) (MissingIf)",
    ),
    site(
        29,
        WrongArith,
        "truncate (set_size): blocks are freed from size / bs, not size.div_ceil(bs) (the partly kept block too) (WrongArith)",
    ),
    site(
        30,
        MissingIf,
        "release: an unlinked file is never freed on its last release (the if and its ifree are missing) (MissingIf)",
    ),
    site(
        31,
        MissingClause,
        "release: an unlinked file is freed on any release, even while still open (\"left == 0\" missing) (MissingClause)",
    ),
    site(
        32,
        MissingIf,
        "read: the \"offset at or past the end of file\" check is missing (MissingIf)",
    ),
    site(
        33,
        MissingClause,
        "unlink/rename (drop_link): a node is freed while still open (\"refs == 0\" missing) (MissingClause)",
    ),
    site(
        34,
        WrongBranch,
        "unlink/rename (drop_link): a node is freed at link count <= 1 instead of == 0 (WrongBranch)",
    ),
    site(
        35,
        MissingClause,
        "truncate (trunc_blocks): direct blocks below the new size are freed too (\"d >= from\" missing) (MissingClause)",
    ),
    site(
        36,
        MissingClause,
        "rename: a directory renamed within its parent moves its parent's link (\"!same_dir\" missing) (MissingClause)",
    ),
    site(
        37,
        MissingClause,
        "trunc (trunc_tree): null pointers are followed too (\"child != 0\" missing): block 0 is freed or parsed (MissingClause)",
    ),
    site(
        38,
        WrongValue,
        "mkdir: a new directory gets link count 1 instead of 2 (WrongValue)",
    ),
    site(
        39,
        WrongValue,
        "ialloc: a new inode gets link count 0 instead of 1 (WrongValue)",
    ),
    site(
        40,
        WrongValue,
        "setattr (chmod): the file-type bits are dropped from the new mode (WrongValue)",
    ),
    site(
        41,
        WrongArith,
        "write: data written at block offset + 1 (WrongArith)",
    ),
    site(
        42,
        WrongArith,
        "read: the block of logical index lbn + 1 is read (WrongArith)",
    ),
    site(
        43,
        WrongArith,
        "dir_add/rename (write_slot): the entry is written one byte past its slot (WrongArith)",
    ),
    site(
        44,
        WrongArith,
        "iput: the inode is written into slot ino + 1 (its neighbour's) (WrongArith)",
    ),
    site(
        45,
        WrongArith,
        "dir_find: the scan starts at slot 0 + 1 (the first entry is never found) (WrongArith)",
    ),
    site(
        46,
        WrongArith,
        "symlink: the target is stored with length len - 1 (WrongArith)",
    ),
    site(
        47,
        WrongVar,
        "rename: the source directory's inode is written to newparent's slot (WrongVar)",
    ),
    site(
        48,
        WrongVar,
        "create/mknod/mkdir/symlink: the new inode is written to the parent's slot (parent for ino) (WrongVar)",
    ),
    site(
        49,
        WrongVar,
        "link: the new entry names newparent instead of ino (WrongVar)",
    ),
    site(
        50,
        WrongVar,
        "unlink/rmdir: the link is dropped on parent instead of the removed inode (WrongVar)",
    ),
    site(
        51,
        WrongVar,
        "rename over a target: the reused slot keeps naming dst instead of src (WrongVar)",
    ),
    site(
        52,
        WrongBranch,
        "write: the copy loop runs while pos <= end (never ends: a hang) (WrongBranch)",
    ),
    site(
        53,
        WrongBranch,
        "bmap: logical block 4 is taken as direct (lbn <= NDIRECT): the indirect pointer is used as a data block (WrongBranch)",
    ),
    site(
        54,
        WrongBranch,
        "dir_find/readdir (scan_dir): slots are scanned while slot <= n (one past the end) (WrongBranch)",
    ),
    site(
        55,
        BitFlip,
        "write (write_data): module memory while a write is copied in (BitFlip)",
    ),
    site(
        56,
        BitFlip,
        "dir_find/readdir (scan_dir): module memory right after a directory block is read (BitFlip)",
    ),
    site(
        57,
        BitFlip,
        "getattr: module memory holding the inode just read (BitFlip)",
    ),
    site(
        58,
        BitFlip,
        "readdir: module memory holding the entries about to be returned (BitFlip)",
    ),
    site(
        59,
        BitFlip,
        "ialloc: module memory holding the new inode and the superblock (BitFlip)",
    ),
    site(
        60,
        PointerCorruption,
        "bmap: module memory while a block path is walked (PointerCorruption)",
    ),
    site(
        61,
        PointerCorruption,
        "lookup: module memory right after the name is found (PointerCorruption)",
    ),
    site(
        62,
        PointerCorruption,
        "rename: module memory holding both directories and the source inode (PointerCorruption)",
    ),
    site(
        63,
        PointerCorruption,
        "trunc (trunc_tree): module memory holding a pointer block being truncated (PointerCorruption)",
    ),
    site(
        64,
        PointerCorruption,
        "fsync: module memory holding the inode (PointerCorruption)",
    ),
    // Issue 5's detection matrix (paper 001, Table 5), not part of issue 6's campaign.
    site(
        65,
        StrayRead,
        "write: a stray read of shared memory (the store) outside protection-manager code",
    ),
    site(
        66,
        StrayWrite,
        "write: a stray write to shared memory (the store) outside protection-manager code",
    ),
    site(
        67,
        BadUpdate,
        "iput: the inode is written back with a block pointer beyond the store",
    ),
    site(
        68,
        HostAccess,
        "write: an access to host-private data (the host's own page)",
    ),
    site(
        69,
        MissingIf,
        "Locks::lock/lock_all: the lock-order check and the sort are left out; locks are taken in argument order (link: file then directory; lookup: directory then file), so requests can deadlock (MissingIf)",
    ),
];
