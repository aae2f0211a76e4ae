//! Fuzzing support for the qcow library: a structure-aware mutator for qcow2 images and the target
//! that runs open → read every cluster → map → check → a few writes on each mutated image.
#![forbid(unsafe_code)]

pub mod mutate;
pub mod target;
