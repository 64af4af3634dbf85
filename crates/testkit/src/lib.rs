#![forbid(unsafe_code)]

pub mod origins;
