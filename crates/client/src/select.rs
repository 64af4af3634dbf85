//! Relay selection.
