//! The `train` feature links libtorch (PyPI torch 2.11.0 via scripts/setup.sh --train) and runs
//! tensor ops on the CPU.
#![cfg(feature = "train")]

use tch::{Device, Kind, Tensor};

#[test]
fn matmul_and_autograd_on_cpu() {
    let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0])
        .reshape([2, 2])
        .set_requires_grad(true);
    let b = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.25]).reshape([2, 2]);
    let c = a.matmul(&b);
    let got: Vec<f32> = Vec::try_from(c.flatten(0, -1)).expect("to vec");
    assert_eq!(got, vec![4.5, -0.5, 9.5, -2.0]);
    c.sum(Kind::Float).backward();
    let grad: Vec<f32> = Vec::try_from(a.grad().flatten(0, -1)).expect("grad to vec");
    // d(sum(a·b))/da = 1 · bᵀ summed over columns: row sums of b.
    assert_eq!(grad, vec![-0.5, 2.25, -0.5, 2.25]);
    assert_eq!(c.device(), Device::Cpu);
}

/// The libtorch lib folder build.rs linked against (same rule: `LIBTORCH_LIB`, else `LIBTORCH`).
#[cfg(target_os = "linux")]
fn build_torch_lib_dir() -> Option<std::path::PathBuf> {
    option_env!("LIBTORCH_LIB")
        .or(option_env!("LIBTORCH"))
        .map(|p| std::path::Path::new(p).join("lib"))
}

/// DT_NEEDED entries of an ELF64 little-endian file, from its PT_DYNAMIC segment.
#[cfg(target_os = "linux")]
fn elf_needed(bytes: &[u8]) -> Vec<String> {
    let u16_at = |o: usize| u16::from_le_bytes(bytes[o..o + 2].try_into().expect("2 bytes"));
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
    assert_eq!(
        &bytes[..6],
        b"\x7fELF\x02\x01",
        "not an ELF64 little-endian file"
    );
    let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36) as usize, u16_at(0x38));
    // (p_type, p_offset, p_vaddr, p_filesz)
    let phdrs: Vec<(u32, u64, u64, u64)> = (0..phnum as usize)
        .map(|i| phoff + i * phentsize)
        .map(|h| (u32_at(h), u64_at(h + 8), u64_at(h + 16), u64_at(h + 32)))
        .collect();
    let (_, dyn_off, _, dyn_size) = *phdrs
        .iter()
        .find(|p| p.0 == 2) // PT_DYNAMIC
        .expect("no PT_DYNAMIC: a static binary cannot have linked libtorch_cuda");
    let entries: Vec<(u64, u64)> = (dyn_off..dyn_off + dyn_size)
        .step_by(16)
        .map(|o| (u64_at(o as usize), u64_at(o as usize + 8)))
        .take_while(|&(tag, _)| tag != 0) // DT_NULL
        .collect();
    let strtab_vaddr = entries
        .iter()
        .find(|e| e.0 == 5) // DT_STRTAB
        .expect("DT_STRTAB")
        .1;
    let strtab = phdrs
        .iter()
        .find(|p| p.0 == 1 && (p.2..p.2 + p.3).contains(&strtab_vaddr)) // PT_LOAD holding it
        .map(|p| (strtab_vaddr - p.2 + p.1) as usize)
        .expect("DT_STRTAB outside every PT_LOAD");
    entries
        .iter()
        .filter(|e| e.0 == 1) // DT_NEEDED
        .map(|e| {
            let s = &bytes[strtab + e.1 as usize..];
            String::from_utf8_lossy(&s[..s.iter().position(|&b| b == 0).expect("NUL")]).into_owned()
        })
        .collect()
}

#[test]
#[cfg(target_os = "linux")]
fn cuda_backend_is_linked() {
    // build.rs forces libtorch_cuda in with --no-as-needed whenever the libtorch it linked has it;
    // without the NEEDED entry CUDA stays silently off on the GPU machine. Checked on the binary
    // itself, so it holds here without a GPU (where is_available() is false).
    let available = tch::Cuda::is_available();
    let Some(lib_dir) = build_torch_lib_dir() else {
        eprintln!("skipped: LIBTORCH was not set at build time (run scripts/setup.sh --train)");
        return;
    };
    if !lib_dir.join("libtorch_cuda.so").exists() {
        eprintln!(
            "skipped: {} has no libtorch_cuda.so (CPU-only libtorch)",
            lib_dir.display()
        );
        return;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let needed = elf_needed(&std::fs::read(&exe).expect("read test binary"));
    assert!(
        needed.iter().any(|n| n == "libtorch_cuda.so"),
        "{} lacks DT_NEEDED libtorch_cuda.so (build.rs --no-as-needed lost?): {needed:?}",
        exe.display()
    );
    // NEEDED means the loader mapped it at startup.
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    assert!(
        maps.contains("/libtorch_cuda.so"),
        "libtorch_cuda.so not mapped"
    );
    eprintln!("libtorch_cuda.so is NEEDED and mapped; Cuda::is_available() = {available}");
}
