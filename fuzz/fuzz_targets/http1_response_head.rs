#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cfr_proto::http1::fuzz_response_head(data));
