//! End-to-end scenarios against the real `deployd` binary.

mod git;
mod settings;
mod skeleton;
