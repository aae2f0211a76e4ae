//! Whole-image metadata changes: rewriting the header cluster (backing file, features, version)
//! and emptying the image (what `commit` leaves of the top image).

use super::Image;
use crate::error::{Error, Result};
use crate::raw::Storage;

impl<S: Storage> Image<S> {
    /// Writes the header cluster from `self.header` (encoded and checked to fit first).
    pub(crate) fn rewrite_header(&mut self) -> Result<()> {
        let mut raw = self.header.encode()?;
        raw.resize(self.cluster_size as usize, 0);
        // Ordering: everything the header describes is durable before the header changes.
        self.flush()?;
        self.file.write_at(&raw, 0).map_err(Error::WriteHeader)?;
        self.file.flush().map_err(Error::Flush)
    }

    /// Records a new backing file name and format in the header (`None`: no backing file). The
    /// data is not touched (`rebase -u`); the backing file opened now, if any, stays open.
    pub fn set_backing_file(&mut self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        self.check_writable()?;
        let mut header = self.header.clone();
        header.backing_file = name.map(str::to_string);
        header.backing_format = name.and(format).map(str::to_string);
        // Refuse a name that does not fit before anything is written.
        header.encode()?;
        self.header = header;
        self.rewrite_header()
    }

    /// Makes every cluster unallocated again (the backing file shows through), keeping the
    /// snapshots: what `commit` does to the image it committed.
    pub fn make_empty(&mut self) -> Result<()> {
        self.check_writable()?;
        self.flush()?;
        let old_l1 = self.l1.clone();
        let empty = vec![0u64; old_l1.len()];
        // Ordering: the empty table is in place before the old tree loses its references.
        self.replace_l1(empty, self.header.size)?;
        self.drop_caches();
        self.adjust_tree(&old_l1, -1)?;
        self.flush()?;
        self.drop_caches();
        Ok(())
    }
}
