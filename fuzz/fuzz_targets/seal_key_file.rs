#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cfr_egress::seal::fuzz_key_file(data));
