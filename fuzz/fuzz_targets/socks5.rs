#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cfr_proto::socks5::fuzz_socks5(data));
