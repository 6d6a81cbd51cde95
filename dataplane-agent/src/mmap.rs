//! Memory-mapped BPF arrays: the agent writes lookup tables and backends as plain memory, with no
//! syscall per element, which is what makes a full state of thousands of services quick to apply.
//!
//! The kernel lays out an mmap-able array as `max_entries` elements of `value_size` rounded up to
//! 8 bytes; the ABI types used here are multiples of 8, so the mapping is a plain `[T]`.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
};

use aya::maps::{Map, MapData, MapError};

#[derive(Debug, thiserror::Error)]
pub enum MmapError {
    #[error("map {name} is not a BPF array")]
    NotAnArray { name: &'static str },
    #[error("map {name}: value size {actual}, expected {expected}")]
    ValueSize {
        name: &'static str,
        actual: u32,
        expected: usize,
    },
    #[error("map {name}: {source}")]
    Info {
        name: &'static str,
        source: MapError,
    },
    #[error("map {name}: mmap failed (was it created with BPF_F_MMAPABLE?): {source}")]
    Mmap {
        name: &'static str,
        source: std::io::Error,
    },
}

pub struct MmapArray<T> {
    ptr: NonNull<T>,
    len: usize,
    bytes: usize,
    // Keeps the map (and so the mapping's object) alive.
    _map: MapData,
}

// SAFETY: the mapping is owned by this value; access follows Rust's borrow rules.
unsafe impl<T: Send> Send for MmapArray<T> {}

impl<T: aya::Pod> MmapArray<T> {
    pub fn new(name: &'static str, map: Map) -> Result<Self, MmapError> {
        const {
            assert!(
                size_of::<T>().is_multiple_of(8),
                "mmap-able elements are 8-byte aligned"
            )
        };
        let Map::Array(data) = map else {
            return Err(MmapError::NotAnArray { name });
        };
        let info = data
            .info()
            .map_err(|source| MmapError::Info { name, source })?;
        if info.value_size() as usize != size_of::<T>() {
            return Err(MmapError::ValueSize {
                name,
                actual: info.value_size(),
                expected: size_of::<T>(),
            });
        }
        let len = info.max_entries() as usize;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let bytes = (len * size_of::<T>()).div_ceil(page) * page;
        // SAFETY: a shared read-write mapping of the map's fd, checked for failure below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(MmapError::Mmap {
                name,
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(addr.cast::<T>()).expect("mmap returned a non-null address");
        Ok(MmapArray {
            ptr,
            len,
            bytes,
            _map: data,
        })
    }

    pub fn as_slice(&self) -> &[T] {
        // SAFETY: `len` elements of `T` are mapped for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as above, and `&mut self` makes this the only reference from this process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> Drop for MmapArray<T> {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}
