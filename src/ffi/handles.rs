//! Every handle the C ABI gives out is a key into one process-wide table, not a pointer to the
//! object. That is what makes a second `release_*`, or a call on a released handle, a reported
//! INVALID_ARGUMENT instead of a double free: keys are never reused. The objects live behind `Arc`s,
//! so a pipeline released while a call on it runs on another thread is freed when that call ends.
//! A lookup takes the table's lock for a hash-map access only; no call runs under it.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};

use super::ops::{ImageSet, LoraObj, PipelineState};
use crate::{Error, Result};

/// An error returned to the host.
pub(crate) struct StatusObj {
    pub code: u32,
    pub message: CString,
}

/// A text returned to the host (JSON).
pub(crate) struct TextObj {
    pub text: CString,
}

/// The objects behind handles.
pub(crate) enum Object {
    Status(Arc<StatusObj>),
    Pipeline(Arc<Mutex<PipelineState>>),
    Lora(Arc<LoraObj>),
    Image(Arc<ImageSet>),
    Text(Arc<TextObj>),
}

static TABLE: LazyLock<Mutex<HashMap<usize, Object>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));
static NEXT: AtomicUsize = AtomicUsize::new(1);

fn table() -> MutexGuard<'static, HashMap<usize, Object>> {
    TABLE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Store `obj` and return its new handle (never NULL, never reused).
pub(crate) fn register<T>(obj: Object) -> *mut T {
    // Keys are multiples of 16, so they look like aligned pointers to debuggers and hosts.
    let key = NEXT.fetch_add(1, Ordering::Relaxed) << 4;
    table().insert(key, obj);
    key as *mut T
}

/// Remove a handle; the object is dropped by the caller, outside the table's lock.
pub(crate) fn unregister<T>(h: *const T, want: fn(&Object) -> bool) -> Option<Object> {
    if h.is_null() {
        return None;
    }
    let mut t = table();
    let key = h as usize;
    if t.get(&key).is_some_and(want) {
        t.remove(&key)
    } else {
        None
    }
}

fn kind_name(o: &Object) -> &'static str {
    match o {
        Object::Status(_) => "status",
        Object::Pipeline(_) => "pipeline",
        Object::Lora(_) => "LoRA",
        Object::Image(_) => "image",
        Object::Text(_) => "string",
    }
}

fn lookup<T, R>(h: *const T, what: &str, pick: impl FnOnce(&Object) -> Option<R>) -> Result<R> {
    if h.is_null() {
        return Err(Error::InvalidArgument(format!("{what} is NULL")));
    }
    let t = table();
    match t.get(&(h as usize)) {
        None => Err(Error::InvalidArgument(format!(
            "{what} is not a live handle (already released, or never created by lorafuse)"
        ))),
        Some(o) => {
            let kind = kind_name(o);
            pick(o).ok_or_else(|| Error::InvalidArgument(format!("{what} is a {kind} handle")))
        }
    }
}

pub(crate) fn pipeline<T>(h: *const T, what: &str) -> Result<Arc<Mutex<PipelineState>>> {
    lookup(h, what, |o| match o {
        Object::Pipeline(p) => Some(p.clone()),
        _ => None,
    })
}

pub(crate) fn lora<T>(h: *const T, what: &str) -> Result<Arc<LoraObj>> {
    lookup(h, what, |o| match o {
        Object::Lora(l) => Some(l.clone()),
        _ => None,
    })
}

pub(crate) fn image<T>(h: *const T) -> Option<Arc<ImageSet>> {
    lookup(h, "image", |o| match o {
        Object::Image(i) => Some(i.clone()),
        _ => None,
    })
    .ok()
}

pub(crate) fn status<T>(h: *const T) -> Option<Arc<StatusObj>> {
    lookup(h, "status", |o| match o {
        Object::Status(s) => Some(s.clone()),
        _ => None,
    })
    .ok()
}

pub(crate) fn text<T>(h: *const T) -> Option<Arc<TextObj>> {
    lookup(h, "string", |o| match o {
        Object::Text(s) => Some(s.clone()),
        _ => None,
    })
    .ok()
}

/// A C string from arbitrary text (interior NULs become U+FFFD).
pub(crate) fn c_string(s: impl Into<String>) -> CString {
    let s: String = s.into();
    CString::new(s).unwrap_or_else(|e| {
        let fixed = String::from_utf8_lossy(&e.into_vec()).replace('\0', "\u{fffd}");
        CString::new(fixed).unwrap_or_default()
    })
}

/// How many handles are live (tests of leaks).
#[allow(dead_code)]
pub(crate) fn live() -> usize {
    table().len()
}
