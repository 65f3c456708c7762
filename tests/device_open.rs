//! Opening a CUDA device the way `train` and `bench train` do (`stages::train::select_device`)
//! sets it up as `device::resolve_device` does: peftpipe's gradient-sum kernel installed and
//! CUDA's memory pool kept. A binary of its own: the gradient add is installed once per process,
//! so no other test may open a device before this one looks.
#![cfg_attr(
    feature = "cuda",
    expect(clippy::print_stderr, reason = "the test prints why it skips")
)]

#[cfg(feature = "cuda")]
#[test]
fn the_train_stage_opens_cuda_through_the_one_place_that_sets_devices_up() {
    if !candle_core::utils::cuda_is_available() {
        eprintln!("skipped: no GPU visible");
        return;
    }
    let device = peftpipe::stages::train::select_device("cuda").expect("CUDA device 0");
    assert!(device.is_cuda());
    // Installing again reports whether it was still missing.
    assert!(
        !peftpipe::ops::cuda::install_gradient_add(),
        "select_device opened CUDA without peftpipe's gradient add (device::resolve_device's setup)"
    );
}

#[test]
fn cpu_and_unbuilt_cuda_devices_are_chosen_without_opening_anything() {
    let device = peftpipe::stages::train::select_device("cpu").expect("the CPU");
    assert!(device.is_cpu());
    if !peftpipe::device::built_with_cuda() {
        let error = peftpipe::stages::train::select_device("cuda:1").expect_err("no CUDA here");
        assert!(
            error.contains("cuda:1") && error.contains("--features cuda"),
            "{error}"
        );
    }
}
