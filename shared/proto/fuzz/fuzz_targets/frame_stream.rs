//! The sensor frame stream decoder: never panics or loops, whatever bytes arrive, however split.
#![no_main]

use cascade_proto::frame::{Feed, FrameDecoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks how the stream is split into reads, as a UART driver would.
    let Some((&split, stream)) = data.split_first() else { return };
    let step = usize::from(split % 64) + 1;
    let mut decoder: FrameDecoder<256> = FrameDecoder::new();
    let mut events = 0u64;
    for read in stream.chunks(step) {
        let mut input = read;
        loop {
            match decoder.feed(input) {
                Feed::Consumed => break,
                Feed::Frame { rest, .. } | Feed::Dropped { rest, .. } => {
                    assert!(rest.len() < input.len(), "the decoder must make progress");
                    input = rest;
                    events += 1;
                }
            }
        }
    }
    let stats = decoder.stats();
    assert_eq!(stats.frames + stats.dropped, events);
});
