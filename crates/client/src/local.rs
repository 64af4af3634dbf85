//! Local proxy listeners.
