//! cowvm VMM library.
