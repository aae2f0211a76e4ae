//! qcow2 disk images: the real QEMU format, checked by `qemu-img`.
#![forbid(unsafe_code)]
