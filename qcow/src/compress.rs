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
