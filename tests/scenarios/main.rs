//! End-to-end scenarios against the real `deployd` binary.

mod auth;
mod brokers;
mod cluster;
mod faults;
mod git;
mod graph;
mod history;
mod llama_tools;
mod logs;
mod pipeline;
mod python;
mod settings;
mod skeleton;
mod ui;
