//! `.npy` parsing: src/weights/npy.rs `parse_f32` (magic, version, header dict, dtype, shape,
//! fortran order, data length). Any input must give `Ok` or `Err`, never a panic, and on `Ok`
//! the shape must account for every value.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((shape, values)) = lorafuse::weights::npy::parse_f32(data) {
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        assert_eq!(
            numel,
            Some(values.len()),
            "shape {shape:?} does not hold the {} values returned",
            values.len()
        );
    }
});
