//! Library errors as Python exceptions: one class per `lorafuse::Error::fault()`, `Cancelled` for a
//! stopped generation, all under `LorafuseError` with `fault` and `code` (the C ABI's stable status
//! code) attributes. A Rust panic never reaches Python as one: [`guard`] catches it, as the C ABI's
//! `guard` does (src/ffi/mod.rs), and raises `InternalError`.

use std::panic::{AssertUnwindSafe, catch_unwind};

use lorafuse::error::Fault;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    lorafuse,
    LorafuseError,
    PyException,
    "Every error lorafuse raises; `fault` says who is at fault, `code` is the C ABI's status code."
);
create_exception!(
    lorafuse,
    UserError,
    LorafuseError,
    "An argument, a request or the set-up: a bad value, a missing file or ONNX Runtime."
);
create_exception!(
    lorafuse,
    FileError,
    LorafuseError,
    "A model, LoRA, config or tokenizer file: unreadable, malformed or not what it claims."
);
create_exception!(
    lorafuse,
    InternalError,
    LorafuseError,
    "lorafuse or a library it runs failed on valid input (a bug: please report it)."
);
create_exception!(
    lorafuse,
    Cancelled,
    LorafuseError,
    "A generation stopped by `Pipeline.cancel()` or a progress callback returning False."
);

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("LorafuseError", py.get_type::<LorafuseError>())?;
    m.add("UserError", py.get_type::<UserError>())?;
    m.add("FileError", py.get_type::<FileError>())?;
    m.add("InternalError", py.get_type::<InternalError>())?;
    m.add("Cancelled", py.get_type::<Cancelled>())?;
    Ok(())
}

/// The exception for a library error.
pub(crate) fn to_py(py: Python<'_>, e: lorafuse::Error) -> PyErr {
    let msg = e.to_string();
    let fault = e.fault();
    let err = match (&e, fault) {
        (lorafuse::Error::Cancelled, _) => Cancelled::new_err(msg),
        (_, Fault::User) => UserError::new_err(msg),
        (_, Fault::File) => FileError::new_err(msg),
        (_, Fault::Program) => InternalError::new_err(msg),
    };
    let value = err.value(py);
    let fault = match fault {
        Fault::User => "user",
        Fault::File => "file",
        Fault::Program => "program",
    };
    // Attributes on a fresh exception object cannot fail in practice; the message stands alone.
    let _ = value.setattr("fault", fault);
    let _ = value.setattr("code", e.code());
    err
}

/// Run entry `entry`'s work `f`, turning a panic into [`lorafuse::Error::Internal`] (no unwinding
/// into Python). Test hook, as the C ABI's `LORAFUSE_FFI_INJECT_PANIC`: when the environment
/// variable `LORAFUSE_PY_INJECT_PANIC` names the entry, it panics here.
pub(crate) fn guard<R>(
    entry: &str,
    f: impl FnOnce() -> lorafuse::Result<R>,
) -> lorafuse::Result<R> {
    catch_unwind(AssertUnwindSafe(|| {
        if std::env::var_os("LORAFUSE_PY_INJECT_PANIC").is_some_and(|v| v == entry) {
            panic!("panic injected into `{entry}` by LORAFUSE_PY_INJECT_PANIC");
        }
        f()
    }))
    .unwrap_or_else(|p| {
        // The payload is a `&str` or `String`, as `panic!` makes them.
        let text = p
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic payload".into());
        Err(lorafuse::Error::Internal(format!(
            "panic in `{entry}`: {text}"
        )))
    })
}

/// Library results in the door's functions: the error as its exception.
pub(crate) trait IntoPy<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPy<T> for lorafuse::Result<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}
