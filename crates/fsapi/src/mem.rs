//! [`MemPm`]: a protection manager over a plain in-process `Vec`, for a module's own unit tests
//! (no host, no FUSE). The real managers live in `fshost`; this one follows the same contract
//! (lowest free block first, zero-filled allocation, reference counts, re-entrant-free locks)
//! so module logic can be tested without mounting anything.

use std::collections::{HashMap, HashSet};

use crate::{BlockNo, Errno, FsResult, Ino, LockId, Pm, Timespec};

/// An in-memory block store with the [`Pm`] contract.
#[derive(Debug)]
pub struct MemPm {
    bs: usize,
    blocks: Vec<u8>,
    used: Vec<bool>,
    refs: HashMap<Ino, u32>,
    locks: HashSet<LockId>,
    clock: i64,
}

impl MemPm {
    /// `nblocks` blocks of `bs` bytes, all free.
    pub fn new(bs: usize, nblocks: u64) -> MemPm {
        MemPm {
            bs,
            blocks: vec![0; bs * nblocks as usize],
            used: vec![false; nblocks as usize],
            refs: HashMap::new(),
            locks: HashSet::new(),
            clock: 1_000_000,
        }
    }

    /// Locks currently held (a request that returns must hold none).
    pub fn held_locks(&self) -> usize {
        self.locks.len()
    }

    /// Reads like [`Pm::bread`] without `&mut` (for a test's own views of the store).
    pub fn peek(&self, b: BlockNo, off: usize, buf: &mut [u8]) -> FsResult<()> {
        let r = self.range(b, off, buf.len())?;
        buf.copy_from_slice(&self.blocks[r]);
        Ok(())
    }

    fn range(&self, b: BlockNo, off: usize, n: usize) -> FsResult<std::ops::Range<usize>> {
        if b.0 >= self.used.len() as u64 || off + n > self.bs {
            return Err(Errno::EINVAL);
        }
        let s = b.0 as usize * self.bs + off;
        Ok(s..s + n)
    }
}

impl Pm for MemPm {
    fn block_size(&self) -> usize {
        self.bs
    }
    fn nblocks(&self) -> u64 {
        self.used.len() as u64
    }
    fn free_blocks(&self) -> u64 {
        self.used.iter().filter(|u| !**u).count() as u64
    }
    fn bread(&mut self, b: BlockNo, off: usize, buf: &mut [u8]) -> FsResult<()> {
        let r = self.range(b, off, buf.len())?;
        buf.copy_from_slice(&self.blocks[r]);
        Ok(())
    }
    fn bwrite(&mut self, b: BlockNo, off: usize, data: &[u8]) -> FsResult<()> {
        let r = self.range(b, off, data.len())?;
        self.blocks[r].copy_from_slice(data);
        Ok(())
    }
    fn get_next_blk(&mut self) -> FsResult<BlockNo> {
        let i = self.used.iter().position(|u| !*u).ok_or(Errno::ENOSPC)?;
        self.used[i] = true;
        let r = self.range(BlockNo(i as u64), 0, self.bs)?;
        self.blocks[r].fill(0);
        Ok(BlockNo(i as u64))
    }
    fn free_blk(&mut self, b: BlockNo) -> FsResult<()> {
        match self.used.get_mut(b.0 as usize) {
            Some(u) if *u => {
                *u = false;
                Ok(())
            }
            _ => Err(Errno::EINVAL),
        }
    }
    fn vref(&mut self, ino: Ino) -> FsResult<()> {
        *self.refs.entry(ino).or_default() += 1;
        Ok(())
    }
    fn vrele(&mut self, ino: Ino) -> FsResult<u32> {
        let r = self
            .refs
            .get_mut(&ino)
            .filter(|r| **r > 0)
            .ok_or(Errno::EINVAL)?;
        *r -= 1;
        Ok(*r)
    }
    fn refs(&self, ino: Ino) -> u32 {
        self.refs.get(&ino).copied().unwrap_or(0)
    }
    fn lock(&mut self, l: LockId) -> FsResult<()> {
        // Single-threaded: a second lock of the same id would wait forever.
        if !self.locks.insert(l) {
            return Err(Errno(libc::EDEADLK));
        }
        Ok(())
    }
    fn unlock(&mut self, l: LockId) -> FsResult<()> {
        if self.locks.remove(&l) {
            Ok(())
        } else {
            Err(Errno::EINVAL)
        }
    }
    fn now(&self) -> Timespec {
        Timespec {
            sec: self.clock,
            nsec: 0,
        }
    }
}
