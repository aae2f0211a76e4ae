//! Turning a descriptor chain into byte streams the device can read and write, without trusting
//! any of it: every buffer is checked against guest RAM, chains that loop or run past the queue
//! size are cut off by virtio-queue and reported as broken, and every copy goes through vm-memory.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMemory;

/// One guest buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A chain split into its device-readable part and its device-writable part.
#[derive(Debug, Default)]
pub(super) struct Chain {
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
    /// Some buffer lies (partly) outside guest RAM.
    pub outside_ram: bool,
    /// A device-readable buffer came after a device-writable one (virtio 1.2 §2.7.4.2 forbids it).
    pub misordered: bool,
}

/// Why a chain cannot be completed at all (there is no status byte to report through).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Broken {
    /// The chain loops, is longer than the queue, or names a descriptor that cannot be read.
    Unterminated,
    /// No descriptor at all (the head could not be read).
    Empty,
}

/// Reads every descriptor of `chain`.
pub(super) fn collect<M>(chain: DescriptorChain<M>, memory: &GuestMemory) -> Result<Chain, Broken>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut parsed = Chain::default();
    let mut last: Option<Descriptor> = None;
    for descriptor in chain {
        let segment = Segment {
            addr: descriptor.addr(),
            len: descriptor.len(),
        };
        if !memory.check_range(segment.addr, segment.len as usize) {
            parsed.outside_ram = true;
        }
        if descriptor.is_write_only() {
            parsed.writable.push(segment);
        } else {
            parsed.misordered |= !parsed.writable.is_empty();
            parsed.readable.push(segment);
        }
        last = Some(descriptor);
    }
    match last {
        None => Err(Broken::Empty),
        // virtio-queue stops a chain when its length reaches the queue size, when a `next`
        // index is out of range, or when a descriptor cannot be read: the last one yielded
        // then still says "next".
        Some(descriptor) if descriptor.has_next() => Err(Broken::Unterminated),
        Some(_) => Ok(parsed),
    }
}

/// Total length of some buffers.
pub(super) fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

/// Calls `each(address, range of buf)` for the parts of the byte stream `segments` that cover
/// `[offset, offset + len)`.
fn for_each_piece(
    segments: &[Segment],
    mut offset: u64,
    len: usize,
    mut each: impl FnMut(
        GuestAddress,
        std::ops::Range<usize>,
    ) -> Result<(), vm_memory::GuestMemoryError>,
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut done = 0usize;
    for segment in segments {
        if done == len {
            break;
        }
        let seg_len = u64::from(segment.len);
        if offset >= seg_len {
            offset -= seg_len;
            continue;
        }
        let n = ((seg_len - offset) as usize).min(len - done);
        let addr = segment.addr.checked_add(offset).ok_or(
            vm_memory::GuestMemoryError::InvalidGuestAddress(segment.addr),
        )?;
        each(addr, done..done + n)?;
        done += n;
        offset = 0;
    }
    if done < len {
        return Err(vm_memory::GuestMemoryError::PartialBuffer {
            expected: len,
            completed: done,
        });
    }
    Ok(())
}

/// Copies `buf.len()` bytes at `offset` of the stream out of guest RAM.
pub(super) fn read_stream(
    memory: &GuestMemory,
    segments: &[Segment],
    offset: u64,
    buf: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let len = buf.len();
    for_each_piece(segments, offset, len, |addr, range| {
        memory.read_slice(&mut buf[range], addr)
    })
}

/// Copies `data` into the stream at `offset` (vm-memory marks the pages dirty).
pub(super) fn write_stream(
    memory: &GuestMemory,
    segments: &[Segment],
    offset: u64,
    data: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    for_each_piece(segments, offset, data.len(), |addr, range| {
        memory.write_slice(&data[range], addr)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn streams_span_segments_and_stay_in_bounds() {
        let memory = create_guest_memory(8 << 20).unwrap();
        let segments = [
            Segment {
                addr: GuestAddress(0x1000),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x2000),
                len: 5,
            },
        ];
        write_stream(&memory, &segments, 1, &[1, 2, 3, 4]).unwrap();
        let mut back = [0u8; 8];
        read_stream(&memory, &segments, 0, &mut back).unwrap();
        assert_eq!(back, [0, 1, 2, 3, 4, 0, 0, 0]);
        assert_eq!(memory.read_obj::<u8>(GuestAddress(0x2001)).unwrap(), 4);
        assert!(
            read_stream(&memory, &segments, 4, &mut [0; 5]).is_err(),
            "past the end"
        );
        let outside = [Segment {
            addr: GuestAddress((8 << 20) - 2),
            len: 4,
        }];
        assert!(write_stream(&memory, &outside, 0, &[9; 4]).is_err());
        assert_eq!(total_len(&segments), 8);
    }
}
