#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cfr_relay::config::fuzz_config(data));
