#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cfr_quic_lb::fuzzing::quic_packet_dcid(data));
