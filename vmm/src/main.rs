//! cowvm CLI.
fn main() {}
