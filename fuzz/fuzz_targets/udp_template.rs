#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cfr_proto::fuzzing::udp_template(data));
