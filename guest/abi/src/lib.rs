//! Guest ABI.
#![no_std]
