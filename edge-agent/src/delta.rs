//! Binary deltas between model versions: zstd with the old file as a reference prefix, the
//! semantics of `zstd --patch-from=OLD NEW` (long-distance matching, a window covering the old
//! file). Pure: bytes in, bytes out. The escalator's registry builds them; the agent applies them
//! and checks the result against the manifest's SHA-256.

use std::io::{self, Read, Write};

/// Compression level for deltas: they are built once per version and sent to every device.
pub const LEVEL: i32 = 19;

/// The window (log2 bytes) that lets matches reach back over all of `base` and `target`.
fn window_log(base: usize, target: usize) -> u32 {
    let span = (base + target).max(1 << 10) as u64;
    // zstd accepts 10..=31 on 64-bit targets; devices bound what they accept (`apply`).
    (64 - (span - 1).leading_zeros()).clamp(10, 31)
}

/// Encodes `target` as a delta against `base`.
pub fn encode(base: &[u8], target: &[u8]) -> io::Result<Vec<u8>> {
    let mut encoder = zstd::stream::write::Encoder::with_ref_prefix(Vec::new(), LEVEL, base)?;
    encoder.long_distance_matching(true)?;
    encoder.window_log(window_log(base.len(), target.len()))?;
    encoder.set_pledged_src_size(Some(target.len() as u64))?;
    encoder.write_all(target)?;
    encoder.finish()
}

/// Rebuilds the target from `base` and `delta`; fails if the result would exceed `max_len`.
pub fn apply(base: &[u8], delta: &[u8], max_len: u64) -> io::Result<Vec<u8>> {
    let mut decoder = zstd::stream::read::Decoder::with_ref_prefix(delta, base)?;
    decoder.window_log_max(31)?;
    let mut out = Vec::new();
    let read = decoder.take(max_len + 1).read_to_end(&mut out)?;
    if read as u64 > max_len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("delta expands beyond {max_len} bytes"),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retrained_model_travels_as_a_small_delta_and_rebuilds_exactly() {
        let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        let base = std::fs::read(models.join("digits-edge.f32.onnx")).unwrap();
        let target = std::fs::read(models.join("testdata/digits-edge.unsure.onnx")).unwrap();
        let delta = encode(&base, &target).unwrap();
        assert!(
            delta.len() * 4 < target.len(),
            "only the last layer changed: delta {} of {} bytes",
            delta.len(),
            target.len()
        );
        assert_eq!(apply(&base, &delta, target.len() as u64).unwrap(), target);
        // Against the wrong base the result differs (the manifest's hash catches it) or fails.
        let other = std::fs::read(models.join("digits-cloud.onnx")).unwrap();
        assert!(apply(&other, &delta, 10 << 20).map_or(true, |r| r != target));
        // And a bound on the output holds.
        assert!(apply(&base, &delta, 100).is_err());
    }
}
