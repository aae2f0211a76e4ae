//! Structure-aware mutations of qcow2 images: bit flips anywhere, and interesting big-endian values
//! written into header fields, L1/L2 entries, refcount table/block entries and snapshot entries,
//! located by reading the seed's own header. Standard library only, so the smoke test in
//! `tests/` can include this file as it is.

/// A small deterministic PRNG (SplitMix64): a (seed, iteration) pair replays a case.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound`; 0 when `bound` is 0.
    pub fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            0
        } else {
            self.next_u64() % bound
        }
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Header fields as (offset, width in bytes), per the qcow2 specification.
pub const HEADER_FIELDS: &[(usize, usize)] = &[
    (4, 4),   // version
    (8, 8),   // backing_file_offset
    (16, 4),  // backing_file_size
    (20, 4),  // cluster_bits
    (24, 8),  // size
    (32, 4),  // crypt_method
    (36, 4),  // l1_size
    (40, 8),  // l1_table_offset
    (48, 8),  // refcount_table_offset
    (56, 4),  // refcount_table_clusters
    (60, 4),  // nb_snapshots
    (64, 8),  // snapshots_offset
    (72, 8),  // incompatible_features
    (80, 8),  // compatible_features
    (88, 8),  // autoclear_features
    (96, 4),  // refcount_order
    (100, 4), // header_length
    (104, 1), // compression_type
];

const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Where the seed's tables are (read leniently: a field that makes no sense is just not used).
#[derive(Debug, Clone, Default)]
pub struct Layout {
    pub cluster_size: u64,
    pub l1_offset: u64,
    pub l1_entries: u64,
    pub reftable_offset: u64,
    pub reftable_entries: u64,
    pub snapshots_offset: u64,
    pub nb_snapshots: u64,
    /// Offsets of the L2 tables the active L1 points at.
    pub l2_tables: Vec<u64>,
    /// Offsets of the refcount blocks the refcount table points at.
    pub refblocks: Vec<u64>,
}

fn be(data: &[u8], offset: usize, width: usize) -> Option<u64> {
    let bytes = data.get(offset..offset.checked_add(width)?)?;
    Some(bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
}

fn put(data: &mut [u8], offset: usize, width: usize, value: u64) {
    if let Some(bytes) = offset
        .checked_add(width)
        .and_then(|end| data.get_mut(offset..end))
    {
        let be = value.to_be_bytes();
        bytes.copy_from_slice(&be[8 - width..]);
    }
}

impl Layout {
    pub fn parse(data: &[u8]) -> Layout {
        let cluster_bits = be(data, 20, 4).unwrap_or(16);
        if !(9..=21).contains(&cluster_bits) {
            return Layout::default();
        }
        let cluster_size = 1u64 << cluster_bits;
        let len = data.len() as u64;
        let inside =
            |offset: u64, bytes: u64| offset.checked_add(bytes).is_some_and(|end| end <= len);
        let mut layout = Layout {
            cluster_size,
            l1_offset: be(data, 40, 8).unwrap_or(0),
            l1_entries: be(data, 36, 4).unwrap_or(0),
            reftable_offset: be(data, 48, 8).unwrap_or(0),
            reftable_entries: be(data, 56, 4).unwrap_or(0) * cluster_size / 8,
            snapshots_offset: be(data, 64, 8).unwrap_or(0),
            nb_snapshots: be(data, 60, 4).unwrap_or(0),
            l2_tables: Vec::new(),
            refblocks: Vec::new(),
        };
        if !inside(layout.l1_offset, layout.l1_entries.saturating_mul(8)) {
            layout.l1_entries = 0;
        }
        if !inside(
            layout.reftable_offset,
            layout.reftable_entries.saturating_mul(8),
        ) {
            layout.reftable_entries = 0;
        }
        for index in 0..layout.l1_entries.min(4096) {
            let entry = be(data, (layout.l1_offset + index * 8) as usize, 8).unwrap_or(0);
            let offset = entry & OFFSET_MASK;
            if offset != 0 && inside(offset, cluster_size) {
                layout.l2_tables.push(offset);
            }
        }
        for index in 0..layout.reftable_entries.min(4096) {
            let offset =
                be(data, (layout.reftable_offset + index * 8) as usize, 8).unwrap_or(0) & !0x1ff;
            if offset != 0 && inside(offset, cluster_size) {
                layout.refblocks.push(offset);
            }
        }
        layout
    }

    /// Offsets that are meaningful (and dangerous) as table or data pointers in this image.
    fn interesting_offsets(&self, file_len: u64) -> Vec<u64> {
        let cluster = self.cluster_size.max(512);
        let mut offsets = vec![
            0,
            cluster,
            self.l1_offset,
            self.reftable_offset,
            self.snapshots_offset,
            file_len / cluster * cluster,
            (file_len / cluster + 1) * cluster,
            1 << 40,
            (1 << 55) - cluster,
            OFFSET_MASK,
            cluster / 2,
            1,
        ];
        offsets.extend(self.l2_tables.iter().take(4));
        offsets.extend(self.refblocks.iter().take(4));
        offsets
    }
}

const INTERESTING_32: &[u64] = &[
    0,
    1,
    2,
    3,
    7,
    8,
    9,
    16,
    21,
    22,
    31,
    32,
    63,
    64,
    104,
    112,
    0x7f,
    0xff,
    0x100,
    0x3ff,
    0x400,
    0x1000,
    0xffff,
    0x1_0000,
    0x1_0001,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
];
const INTERESTING_64: &[u64] = &[
    0,
    1,
    0x200,
    0x1_0000,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 55,
    1 << 56,
    1 << 62,
    1 << 63,
    i64::MAX as u64,
    u64::MAX,
    u64::MAX - 511,
];

/// One mutated copy of `seed` (1–4 mutations).
pub fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut data = seed.to_vec();
    let layout = Layout::parse(seed);
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        mutate_once(&mut data, &layout, rng);
    }
    data
}

fn mutate_once(data: &mut Vec<u8>, layout: &Layout, rng: &mut Rng) {
    if data.is_empty() {
        data.push(rng.next_u64() as u8);
        return;
    }
    let len = data.len() as u64;
    let offsets = layout.interesting_offsets(len);
    let cluster = layout.cluster_size.max(512);
    match rng.below(12) {
        // A bit flip anywhere.
        0 => {
            let at = rng.below(len) as usize;
            data[at] ^= 1 << rng.below(8);
        }
        // A bit flip in the header cluster's first 512 bytes (header, extensions, backing name).
        1 => {
            let at = rng.below(len.min(512)) as usize;
            data[at] ^= 1 << rng.below(8);
        }
        // A header field gets an interesting value (or an interesting offset).
        2 | 3 => {
            let (offset, width) = rng.pick(HEADER_FIELDS);
            let value = match width {
                8 if rng.below(2) == 0 => rng.pick(&offsets) + rng.below(2) * rng.pick(&[8, 0x200]),
                8 => rng.pick(INTERESTING_64),
                1 => rng.below(4),
                _ => rng.pick(INTERESTING_32),
            };
            put(data, offset, width, value);
        }
        // An L1 entry.
        4 => {
            if layout.l1_entries > 0 {
                let index = rng.below(layout.l1_entries.min(4096));
                let value = table_value(rng, &offsets);
                put(data, (layout.l1_offset + index * 8) as usize, 8, value);
            }
        }
        // An L2 entry: normal, zero, compressed, unaligned, pointing at metadata or past EOF.
        5 | 6 => {
            if let Some(&table) = layout
                .l2_tables
                .get(rng.below(layout.l2_tables.len() as u64) as usize)
            {
                let index = rng.below(cluster / 8);
                let value = match rng.below(4) {
                    0 => table_value(rng, &offsets),
                    1 => {
                        COMPRESSED
                            | (rng.below(1 << 8) << (62 - (cluster.trailing_zeros() - 8)))
                            | rng.below(len)
                    }
                    2 => rng.pick(&offsets) | 1 | rng.pick(&[0, COPIED]),
                    _ => rng.pick(INTERESTING_64),
                };
                put(data, (table + index * 8) as usize, 8, value);
            }
        }
        // A refcount table entry.
        7 => {
            if layout.reftable_entries > 0 {
                let index = rng.below(layout.reftable_entries.min(64));
                let value = rng.pick(&offsets) | rng.pick(&[0, 0x100, 1]);
                put(
                    data,
                    (layout.reftable_offset + index * 8) as usize,
                    8,
                    value,
                );
            }
        }
        // Refcount block bytes: zeros, saturation, random.
        8 => {
            if let Some(&block) = layout.refblocks.first() {
                let at = (block + rng.below(cluster.min(512))) as usize;
                let random = rng.next_u64() as u8;
                let value = rng.pick(&[0u8, 0xff, 1, 2, random]);
                if let Some(byte) = data.get_mut(at) {
                    *byte = value;
                }
            }
        }
        // Snapshot table fields (only meaningful when the seed has snapshots).
        9 => {
            if layout.nb_snapshots > 0 {
                let base = layout.snapshots_offset as usize;
                let (offset, width) =
                    rng.pick(&[(0usize, 8usize), (8, 4), (12, 2), (14, 2), (32, 4), (36, 4)]);
                let value = if width == 8 {
                    table_value(rng, &offsets)
                } else {
                    rng.pick(INTERESTING_32)
                };
                put(data, base.saturating_add(offset), width, value);
            }
        }
        // Truncate, or extend with junk.
        10 => {
            if rng.below(2) == 0 {
                let cut = rng.below(len) as usize;
                data.truncate(cut.max(1));
            } else {
                let extra = rng.below(cluster * 2) as usize;
                data.extend((0..extra).map(|_| rng.next_u64() as u8));
            }
        }
        // Copy one cluster over another (e.g. the header over an L2 table).
        _ => {
            let clusters = len / cluster;
            if clusters >= 2 {
                let from = (rng.below(clusters) * cluster) as usize;
                let to = (rng.below(clusters) * cluster) as usize;
                let chunk = data[from..from + cluster as usize].to_vec();
                data[to..to + cluster as usize].copy_from_slice(&chunk);
            }
        }
    }
}

/// A value for a table entry: an interesting offset, with or without COPIED, sometimes unaligned.
fn table_value(rng: &mut Rng, offsets: &[u64]) -> u64 {
    let offset = rng.pick(offsets);
    let flags = rng.pick(&[0, COPIED, COPIED | 1, 0x7f00_0000_0000_0000]);
    let skew = rng.pick(&[0, 0, 0x200, 8]);
    offset.wrapping_add(skew) | flags
}
