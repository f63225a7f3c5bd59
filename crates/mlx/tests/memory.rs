// SPDX-License-Identifier: EUPL-1.2
//! Memory controls: limits set and restored, active/peak/cache figures,
//! clearing the cache and resetting the peak; device information and the
//! MLX version. MLX's figures are process-wide, so the tests of this binary
//! that read them take a lock.

mod common;

use std::sync::{Mutex, MutexGuard};

use mlx::device::{self, Device};
use mlx::{Dtype, memory, mlx_version, ops};

static LOCK: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

const MIB: usize = 1 << 20;

#[test]
fn limits_are_set_and_restored() {
    let _g = serial();
    let original = memory::memory_limit().unwrap();
    assert!(original > 0);
    let prev = memory::set_memory_limit(original / 2).unwrap();
    assert_eq!(prev, original);
    assert_eq!(memory::memory_limit().unwrap(), original / 2);
    assert_eq!(memory::set_memory_limit(original).unwrap(), original / 2);
    assert_eq!(memory::memory_limit().unwrap(), original);

    let cache = memory::set_cache_limit(64 * MIB).unwrap();
    assert_eq!(memory::set_cache_limit(cache).unwrap(), 64 * MIB);

    // The CPU backend has no wired memory: it accepts the call and reports 0.
    let wired = memory::set_wired_limit(0).unwrap();
    assert_eq!(memory::set_wired_limit(wired).unwrap(), 0);
}

#[test]
fn active_peak_and_cache_figures() {
    let _g = serial();
    common::settle();
    memory::clear_cache().unwrap();
    let before = memory::stats().unwrap();
    assert_eq!(before.cache, 0);
    memory::reset_peak_memory().unwrap();
    assert_eq!(memory::peak_memory().unwrap(), memory::active_memory().unwrap());

    let a = ops::ones(&[MIB as i32], Dtype::Float32).unwrap(); // 4 MiB
    a.eval().unwrap();
    let during = memory::stats().unwrap();
    assert!(during.active >= before.active + 4 * MIB, "{before:?} -> {during:?}");
    assert!(during.peak >= during.active);

    drop(a);
    common::settle();
    let after = memory::stats().unwrap();
    assert_eq!(after.active, before.active, "active memory returns when the array is dropped");
    assert!(after.peak >= before.active + 4 * MIB, "the peak remembers the array");
    assert!(after.cache >= 4 * MIB, "the freed buffer is cached: {after:?}");

    memory::clear_cache().unwrap();
    assert_eq!(memory::cache_memory().unwrap(), 0);
    memory::reset_peak_memory().unwrap();
    assert_eq!(memory::peak_memory().unwrap(), memory::active_memory().unwrap());
}

#[test]
fn a_zero_cache_limit_disables_the_cache() {
    let _g = serial();
    memory::clear_cache().unwrap();
    let prev = memory::set_cache_limit(0).unwrap();
    let a = ops::ones(&[MIB as i32], Dtype::Float32).unwrap();
    a.eval().unwrap();
    drop(a);
    assert_eq!(memory::cache_memory().unwrap(), 0);
    memory::set_cache_limit(prev).unwrap();
}

#[test]
fn device_information() {
    let _g = serial();
    // The tests run where MLX has no GPU: the CPU is the default and best device.
    assert!(Device::Cpu.is_available());
    let best = Device::best();
    assert_eq!(best == Device::Gpu, Device::Gpu.is_available());
    assert_eq!(device::current().unwrap(), Device::mlx_default().unwrap());
    let info = Device::Cpu.info().unwrap();
    assert_eq!(info.device, Device::Cpu);
    assert!(!info.name().is_empty());
    assert_eq!(Device::Cpu.to_string(), "cpu");
    assert_eq!(Device::Gpu.to_string(), "gpu");
    if !Device::Gpu.is_available() {
        let e = device::DeviceScope::new(Device::Gpu).err().expect("no GPU scope without a GPU");
        assert_eq!(e.op(), "device_scope");
    }
    device::synchronize(None).unwrap();
    device::synchronize(Some(Device::Cpu)).unwrap();
}

#[test]
fn device_scopes_are_per_thread_and_nest() {
    let _g = serial();
    let before = device::current().unwrap();
    {
        let _cpu = device::DeviceScope::new(Device::Cpu).unwrap();
        assert_eq!(device::current().unwrap(), Device::Cpu);
        let out = ops::add_scalar(&common::arr(&[1.0], &[1]), 1.0).unwrap();
        assert_eq!(common::vals(&out), vec![2.0]);
        // Another thread keeps its own (default) choice.
        std::thread::spawn(move || assert_eq!(device::current().unwrap(), Device::mlx_default().unwrap()))
            .join()
            .unwrap();
    }
    assert_eq!(device::current().unwrap(), before);
    let v = device::with_device(Device::Cpu, || common::vals(&ops::ones(&[2], Dtype::Float32).unwrap())).unwrap();
    assert_eq!(v, vec![1.0, 1.0]);
}

#[test]
fn mlx_version_is_pinned() {
    assert_eq!(mlx_version(), "0.32.4");
}
