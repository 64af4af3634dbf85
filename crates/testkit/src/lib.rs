#![forbid(unsafe_code)]

pub mod browser;
pub mod netns;
pub mod origins;
pub mod relay;
pub mod tunnels;
