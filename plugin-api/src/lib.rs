//! The lorafuse plugin ABI (ONNX Runtime's `GetApi(version)` shape, rustls-ffi's discipline).
//!
//! This crate holds only the ABI definition: stable status codes and, as the plugin issue lands,
//! the `#[repr(C)]` function tables. Both the cdylib and Rust hosts depend on it.

/// Version of the function table this crate describes. Tables are append-only.
pub const LORAFUSE_API_VERSION: u32 = 1;

/// Stable status codes. Never renumber; retired codes stay as comments.
pub mod code {
    pub const OK: u32 = 0;
    pub const INVALID_ARGUMENT: u32 = 1;
    pub const NO_SUCH_FILE: u32 = 2;
    pub const MODEL: u32 = 3;
    pub const RUNTIME: u32 = 4;
    pub const CANCELLED: u32 = 5;
    pub const PANIC: u32 = 99;
}
