// SPDX-License-Identifier: EUPL-1.2
//! Devices, the per-thread device choice, and device information.
//!
//! MLX runs on Metal (Apple Silicon), CUDA or the CPU. Every op in this crate
//! runs on the *current device of the calling thread*: MLX's default device
//! unless a [`DeviceScope`] (see [`with_device`]) says otherwise. The choice is
//! kept per thread, so two engine threads can use different devices without
//! touching MLX's process-wide default.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::os::raw::c_int;

use crate::error::{Error, Result};
use crate::ffi::{check, string_out, sys};

/// An MLX device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// The CPU.
    Cpu,
    /// The GPU: Metal on Apple Silicon, CUDA on NVIDIA.
    Gpu,
}

impl Device {
    pub(crate) fn code(self) -> c_int {
        match self {
            Device::Cpu => sys::mlxs_device_kind::MLXS_DEV_CPU,
            Device::Gpu => sys::mlxs_device_kind::MLXS_DEV_GPU,
        }
    }

    /// Whether MLX can run on this device here.
    pub fn is_available(self) -> bool {
        let mut out = false;
        // SAFETY: writes one bool.
        let status = unsafe { sys::mlxs_device_available(self.code(), &mut out) };
        check("device_available", status).is_ok() && out
    }

    /// The best device here: the GPU when MLX has one, otherwise the CPU.
    pub fn best() -> Device {
        if Device::Gpu.is_available() { Device::Gpu } else { Device::Cpu }
    }

    /// MLX's process-wide default device.
    pub fn mlx_default() -> Result<Device> {
        let mut kind: c_int = 0;
        // SAFETY: writes one int.
        check("default_device", unsafe { sys::mlxs_default_device(&mut kind) })?;
        Ok(if kind == sys::mlxs_device_kind::MLXS_DEV_CPU { Device::Cpu } else { Device::Gpu })
    }

    /// Information about the device, as MLX reports it.
    pub fn info(self) -> Result<DeviceInfo> {
        // SAFETY: `out` is a valid out pointer.
        let text = string_out("device_info", |out| unsafe { sys::mlxs_device_info_json(self.code(), out) })?;
        let properties: BTreeMap<String, serde_json::Value> = serde_json::from_str(&text)
            .map_err(|e| Error::invalid("device_info", format!("unreadable device info {text:?}: {e}")))?;
        Ok(DeviceInfo { device: self, properties })
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Gpu => "gpu",
        })
    }
}

/// Device properties as MLX reports them. Keys vary by backend: Metal gives
/// `architecture`, `memory_size`, `max_buffer_length`,
/// `max_recommended_working_set_size`; CUDA gives `device_name`,
/// `total_memory`, `free_memory`, `compute_capability_major`, ...
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    /// The device described.
    pub device: Device,
    /// Every property, by name.
    pub properties: BTreeMap<String, serde_json::Value>,
}

impl DeviceInfo {
    /// A string property.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.properties.get(key).and_then(|v| v.as_str())
    }

    /// A numeric property.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.properties.get(key).and_then(|v| v.as_u64())
    }

    /// A human-readable name: `device_name`, else `architecture`, else the device kind.
    pub fn name(&self) -> String {
        self.get_str("device_name")
            .or_else(|| self.get_str("architecture"))
            .map_or_else(|| self.device.to_string(), str::to_string)
    }

    /// Total memory of the device in bytes, when MLX reports it.
    pub fn memory_bytes(&self) -> Option<u64> {
        self.get_u64("memory_size").or_else(|| self.get_u64("total_memory"))
    }
}

thread_local! {
    static CURRENT: Cell<c_int> = const { Cell::new(sys::mlxs_device_kind::MLXS_DEV_DEFAULT) };
}

/// The device code ops on this thread pass to the shim.
pub(crate) fn current_code() -> c_int {
    CURRENT.with(Cell::get)
}

/// The device ops on this thread run on: the scoped choice, else MLX's default.
pub fn current() -> Result<Device> {
    match current_code() {
        c if c == sys::mlxs_device_kind::MLXS_DEV_CPU => Ok(Device::Cpu),
        c if c == sys::mlxs_device_kind::MLXS_DEV_GPU => Ok(Device::Gpu),
        _ => Device::mlx_default(),
    }
}

/// Restores the previous per-thread device when dropped. Not `Send`: it
/// belongs to the thread that made it.
#[must_use = "the device choice ends when the scope is dropped"]
pub struct DeviceScope {
    previous: c_int,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl DeviceScope {
    /// Makes `device` the current device of this thread until the scope drops.
    pub fn new(device: Device) -> Result<Self> {
        if !device.is_available() {
            return Err(Error::invalid("device_scope", format!("device {device} is not available in this MLX build")));
        }
        let previous = CURRENT.with(|c| c.replace(device.code()));
        Ok(DeviceScope { previous, _not_send: std::marker::PhantomData })
    }
}

impl Drop for DeviceScope {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.previous));
    }
}

/// Runs `f` with `device` as this thread's current device.
pub fn with_device<T>(device: Device, f: impl FnOnce() -> T) -> Result<T> {
    let _scope = DeviceScope::new(device)?;
    Ok(f())
}

/// Blocks until all work queued on the device's stream of this thread is done.
pub fn synchronize(device: Option<Device>) -> Result<()> {
    let code = device.map_or(sys::mlxs_device_kind::MLXS_DEV_DEFAULT, Device::code);
    // SAFETY: plain call.
    check("synchronize", unsafe { sys::mlxs_synchronize(code) })
}

/// Waits until every task this thread queued on `device`'s stream, and on the
/// CPU stream (host reads copy there), has run. A thread that used MLX calls
/// this before it ends: MLX's stream workers outlive the thread, and a task
/// still queued holds buffers it frees later; if that happens while the
/// process exits, it races MLX's allocator being destroyed (a corrupted heap
/// at exit). Errors are ignored: the thread is ending, and a failed step
/// already reported its error.
pub fn finish_thread(device: Device) {
    let _ = synchronize(Some(device));
    if device != Device::Cpu {
        let _ = synchronize(Some(Device::Cpu));
    }
}

/// Calls [`finish_thread`] when dropped: declare it first in a thread that
/// uses MLX, so it runs after everything else the thread owns is freed, on
/// every way out (early returns and panics included).
pub struct FinishThread(pub Device);

impl Drop for FinishThread {
    fn drop(&mut self) {
        finish_thread(self.0);
    }
}

/// The MLX version the library runs against, e.g. "0.32.4".
pub fn mlx_version() -> String {
    // SAFETY: returns a static NUL-terminated string owned by MLX.
    unsafe { std::ffi::CStr::from_ptr(sys::mlxs_version()) }.to_string_lossy().into_owned()
}
