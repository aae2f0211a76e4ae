//! Decompression of compressed clusters: raw deflate (QEMU's "zlib") and zstd.

/// Raw deflate (QEMU's window bits −12); succeeds once exactly one cluster was produced.
pub(crate) fn inflate_raw(input: &[u8], output: &mut [u8]) -> std::result::Result<(), String> {
    let mut inflater = flate2::Decompress::new(false);
    match inflater.decompress(input, output, flate2::FlushDecompress::Finish) {
        Ok(_) | Err(_) if inflater.total_out() as usize == output.len() => Ok(()),
        Ok(status) => Err(format!(
            "deflate stream ended early ({status:?}, {} bytes)",
            inflater.total_out()
        )),
        Err(e) => Err(e.to_string()),
    }
}

pub(crate) fn unzstd(input: &[u8], output: &mut [u8]) -> std::result::Result<(), String> {
    use std::io::Read;
    let mut source = input;
    let mut decoder =
        ruzstd::decoding::StreamingDecoder::new(&mut source).map_err(|e| e.to_string())?;
    decoder.read_exact(output).map_err(|e| e.to_string())
}

/// Compresses one cluster for a compressed-cluster write, the way QEMU does: raw deflate with a
/// 4 KiB window (what QEMU's inflate accepts) at zlib's default level, or a zstd frame. `None`
/// when the result would not be smaller than `limit` bytes (the caller writes the cluster as is).
pub(crate) fn compress_cluster(
    kind: crate::header::CompressionType,
    input: &[u8],
    limit: usize,
) -> std::result::Result<Option<Vec<u8>>, String> {
    match kind {
        crate::header::CompressionType::Deflate => {
            let mut deflater =
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
            let mut out = Vec::with_capacity(limit);
            match deflater.compress_vec(input, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => Ok(Some(out)),
                Ok(_) => Ok(None),
                Err(e) => Err(e.to_string()),
            }
        }
        crate::header::CompressionType::Zstd => {
            let out = ruzstd::encoding::compress_to_vec(
                input,
                ruzstd::encoding::CompressionLevel::Fastest,
            );
            Ok((out.len() < limit).then_some(out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::CompressionType;

    #[test]
    fn compressed_clusters_round_trip() {
        let cluster: Vec<u8> = (0..65536u32).map(|i| (i / 100 % 7) as u8).collect();
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            let packed = compress_cluster(kind, &cluster, 65535).unwrap().unwrap();
            assert!(packed.len() < 4096, "{kind:?}: {} bytes", packed.len());
            let mut out = vec![0u8; 65536];
            match kind {
                CompressionType::Deflate => inflate_raw(&packed, &mut out).unwrap(),
                CompressionType::Zstd => unzstd(&packed, &mut out).unwrap(),
            }
            assert_eq!(out, cluster);
        }
    }

    #[test]
    fn incompressible_clusters_are_refused() {
        let mut rng = 0x1234_5678u64;
        let cluster: Vec<u8> = (0..4096)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect();
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            assert_eq!(compress_cluster(kind, &cluster, 4095).unwrap(), None);
        }
    }
}
