#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cfr_proto::fuzzing::http1_request_head(data));
