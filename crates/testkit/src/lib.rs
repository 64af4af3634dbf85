#![forbid(unsafe_code)]

pub mod origins;
pub mod relay;
pub mod netns;
