//! Diagnostics knob `LORAFUSE_MEM_TRACE=1`: where a pipeline's device memory goes. At each stage
//! of an image (pipeline open, prompt encoding, the first and last UNet step, the VAE decode) one
//! line on stderr with the device's used memory (`cudaMemGetInfo`, what nvidia-smi reports) and
//! every session's CUDA arena (ONNX Runtime's `AllocatorGetStats`: `InUse`, `TotalAllocated`,
//! `MaxInUse`, ...). Off by default; nothing is loaded or asked unless the variable is `1`.

use std::ffi::CStr;
use std::sync::OnceLock;

use ort::AsPointer;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;

/// Whether `LORAFUSE_MEM_TRACE=1` is set (read once).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("LORAFUSE_MEM_TRACE").as_deref() == Ok("1"))
}

/// The device's used memory in MiB (all processes, as nvidia-smi counts it).
fn device_used_mib() -> Option<usize> {
    let (free, total) = super::cuda_rt::mem_get_info()?;
    Some((total - free) >> 20)
}

/// The CUDA arena statistics of `session` on `device_id` as `key=value` pairs (bytes in MiB).
fn arena_stats(session: &Session, device_id: i32) -> Option<String> {
    let info = MemoryInfo::new(
        AllocationDevice::CUDA,
        device_id,
        AllocatorType::Device,
        MemoryType::Default,
    )
    .ok()?;
    let alloc = Allocator::new(session, info).ok()?;
    let api = ort::api();
    let mut kvps: *mut ort::sys::OrtKeyValuePairs = std::ptr::null_mut();
    // SAFETY: a live allocator of this process's ORT; `kvps` is released below.
    let status = unsafe { (api.AllocatorGetStats)(alloc.ptr(), &mut kvps) };
    if !status.0.is_null() {
        // SAFETY: a status returned by the API is released once.
        unsafe { (api.ReleaseStatus)(status.0) };
        return None;
    }
    if kvps.is_null() {
        return None;
    }
    let (mut keys, mut values, mut n) = (std::ptr::null(), std::ptr::null(), 0usize);
    // SAFETY: `kvps` is valid; the arrays it hands out live as long as it does.
    unsafe { (api.GetKeyValuePairs)(kvps, &mut keys, &mut values, &mut n) };
    let mut out = Vec::new();
    for i in 0..n {
        // SAFETY: `n` entries of NUL-terminated strings owned by `kvps`.
        let (k, v) = unsafe {
            (
                CStr::from_ptr(*keys.add(i)).to_string_lossy().into_owned(),
                CStr::from_ptr(*values.add(i))
                    .to_string_lossy()
                    .into_owned(),
            )
        };
        let v = match v.parse::<u64>() {
            Ok(b) if k.contains("Alloc") || k.contains("InUse") || k.contains("Size") => {
                format!("{:.1}M", b as f64 / (1u64 << 20) as f64)
            }
            _ => v,
        };
        out.push(format!("{k}={v}"));
    }
    // SAFETY: released once, after the last read of its strings.
    unsafe { (api.ReleaseKeyValuePairs)(kvps) };
    Some(out.join(" "))
}

/// One trace line for `stage`: the device's used memory, then each named session's arena.
pub fn trace(stage: &str, device_id: i32, sessions: &[(&str, Option<&Session>)]) {
    if !enabled() {
        return;
    }
    let used = device_used_mib().map_or_else(|| "?".to_string(), |m| m.to_string());
    eprintln!("[mem] {stage}: device used {used} MiB");
    for (name, s) in sessions {
        if let Some(s) = s {
            let stats = arena_stats(s, device_id).unwrap_or_else(|| "no CUDA arena".into());
            eprintln!("[mem]   {name}: {stats}");
        }
    }
}
