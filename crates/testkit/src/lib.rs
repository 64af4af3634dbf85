#![forbid(unsafe_code)]

pub mod browser;
pub mod netns;
pub mod origins;
pub mod relay;
pub mod tunnels;

/// `s` as a JSON string literal, for the JSON lines the example programs print.
pub fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}
