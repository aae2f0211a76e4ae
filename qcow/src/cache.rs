//! A bounded, least-recently-used cache of cluster-sized metadata tables (L2 tables, refcount
//! blocks) keyed by host offset. Dirty tables are written back through a caller-supplied closure, so
//! the caller decides what must reach the disk first.

use std::collections::HashMap;

#[derive(Debug)]
struct Slot<T> {
    offset: u64,
    value: T,
    dirty: bool,
    last_used: u64,
}

/// Bounded table cache. `capacity` is at least 1.
#[derive(Debug)]
pub struct TableCache<T> {
    capacity: usize,
    slots: Vec<Slot<T>>,
    index: HashMap<u64, usize>,
    tick: u64,
}

impl<T> TableCache<T> {
    /// A cache holding at most `capacity` tables (clamped to at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        TableCache {
            capacity,
            slots: Vec::new(),
            index: HashMap::new(),
            tick: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn contains(&self, offset: u64) -> bool {
        self.index.contains_key(&offset)
    }

    /// The cached table at `offset`, if any.
    pub fn get(&mut self, offset: u64) -> Option<&T> {
        let slot = *self.index.get(&offset)?;
        self.tick += 1;
        self.slots[slot].last_used = self.tick;
        Some(&self.slots[slot].value)
    }

    /// The cached table at `offset` for modification; marks it dirty.
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut T> {
        let slot = *self.index.get(&offset)?;
        self.tick += 1;
        let slot = &mut self.slots[slot];
        slot.last_used = self.tick;
        slot.dirty = true;
        Some(&mut slot.value)
    }

    /// Inserts `value` for `offset`. When the cache is full the least recently used table is
    /// evicted, after `write_back(offset, table)` succeeded if it was dirty.
    pub fn insert<E>(
        &mut self,
        offset: u64,
        value: T,
        dirty: bool,
        write_back: impl FnOnce(u64, &T) -> Result<(), E>,
    ) -> Result<(), E> {
        self.tick += 1;
        if let Some(&slot) = self.index.get(&offset) {
            let slot = &mut self.slots[slot];
            slot.value = value;
            slot.dirty |= dirty;
            slot.last_used = self.tick;
            return Ok(());
        }
        let new_slot = Slot {
            offset,
            value,
            dirty,
            last_used: self.tick,
        };
        if self.slots.len() < self.capacity {
            self.index.insert(offset, self.slots.len());
            self.slots.push(new_slot);
            return Ok(());
        }
        let victim = self
            .slots
            .iter()
            .enumerate()
            .min_by_key(|(_, slot)| slot.last_used)
            .map(|(i, _)| i)
            .unwrap_or(0);
        {
            let old = &self.slots[victim];
            if old.dirty {
                write_back(old.offset, &old.value)?;
            }
        }
        self.index.remove(&self.slots[victim].offset);
        self.index.insert(offset, victim);
        self.slots[victim] = new_slot;
        Ok(())
    }

    /// Whether any table is dirty.
    pub fn has_dirty(&self) -> bool {
        self.slots.iter().any(|slot| slot.dirty)
    }

    /// Writes every dirty table through `write_back` (in offset order) and marks it clean.
    pub fn flush_dirty<E>(
        &mut self,
        mut write_back: impl FnMut(u64, &T) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut dirty: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].dirty)
            .collect();
        dirty.sort_by_key(|&i| self.slots[i].offset);
        for i in dirty {
            write_back(self.slots[i].offset, &self.slots[i].value)?;
            self.slots[i].dirty = false;
        }
        Ok(())
    }

    /// Drops the table at `offset` without writing it.
    pub fn remove(&mut self, offset: u64) {
        if let Some(slot) = self.index.remove(&offset) {
            let last = self.slots.len() - 1;
            self.slots.swap(slot, last);
            self.slots.pop();
            if slot < self.slots.len() {
                self.index.insert(self.slots[slot].offset, slot);
            }
        }
    }

    /// Drops everything without writing.
    pub fn clear(&mut self) {
        self.slots.clear();
        self.index.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_and_writes_back_dirty() {
        let mut cache = TableCache::new(2);
        let nothing = |_: u64, _: &u32| -> Result<(), ()> { panic!("no write back expected") };
        cache.insert(1, 10u32, false, nothing).unwrap();
        cache.insert(2, 20u32, false, nothing).unwrap();
        *cache.get_mut(1).unwrap() = 11;
        cache.get(2);
        let mut written = Vec::new();
        cache
            .insert(3, 30, false, |off, val: &u32| -> Result<(), ()> {
                written.push((off, *val));
                Ok(())
            })
            .unwrap();
        assert_eq!(written, vec![(1, 11)]);
        assert!(!cache.contains(1));
        assert_eq!(cache.get(2), Some(&20));
        cache.remove(2);
        assert!(!cache.contains(2));
        assert_eq!(cache.get(3), Some(&30));
    }
}
