//! Boundaries in files: a private directory, a background writer and a prefetching reader.
//!
//! Each boundary is one safetensors file, written by a writer thread (the forward hands it over
//! through a bounded queue, so memory stays bounded when the disk is slower than the layers),
//! checksummed (CRC-32) and length-checked on load, and removed once read. The writer only ever
//! reads host memory: a boundary on a device is copied off it by the forward's own thread, where
//! the copy is ordered after the kernels that wrote it (on CUDA, into a pinned buffer on a side
//! stream that first waits for the compute stream; the writer waits for that copy's event before
//! it reads a byte), so a file and its checksum hold the forward's data. The directory is
//! `0700`, its files `0600`; it is removed when the engine and its last boundary are dropped,
//! including on error and during a panic's unwinding. A process killed without unwinding
//! (`SIGKILL`, or a `SIGTERM` nobody handles) cannot remove it: the next engine on the same root
//! and machine finds it by its name (process id, machine tag) and removes it once that process
//! is gone.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

#[cfg(feature = "cuda")]
use super::staging::{Staged, Stager};
use super::{BoundaryStore, Fetched, file};
use crate::error::{Error, Result};
use crate::sync::lock;

/// Where and how boundaries go to disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The directory under which the engine creates its private directory.
    pub root: PathBuf,
    /// How many boundaries the reader loads ahead of the backward pass.
    pub prefetch: usize,
    /// How many boundaries may wait for the writer before the forward pass waits for it.
    pub write_queue: usize,
}

impl Default for DiskConfig {
    fn default() -> Self {
        Self {
            root: std::env::temp_dir(),
            prefetch: 2,
            write_queue: 2,
        }
    }
}

/// The engine's private directory, removed with everything in it on drop.
#[derive(Debug)]
struct PrivateDir {
    path: PathBuf,
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        // Nothing to report to from a destructor; a missing directory is the goal anyway.
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// What the writer reports for one file.
#[derive(Debug, Clone, Copy)]
struct Written {
    len: u64,
    crc: u32,
    took: Duration,
}

struct Job {
    payload: Payload,
    path: PathBuf,
    done: mpsc::Sender<std::result::Result<Written, String>>,
}

/// A boundary in host memory, or on its way there, for the writer.
enum Payload {
    /// A tensor in host memory.
    Host(Tensor),
    /// A CUDA boundary being copied into a pinned buffer.
    #[cfg(feature = "cuda")]
    Pinned(Staged),
}

impl Payload {
    /// The file's bytes; waits for a pinned copy to complete.
    fn encode(&self) -> candle_core::Result<Vec<u8>> {
        match self {
            Payload::Host(tensor) => file::encode(tensor),
            #[cfg(feature = "cuda")]
            Payload::Pinned(staged) => staged.encode(),
        }
    }
}

/// The disk store of one engine.
#[derive(Debug)]
pub(crate) struct DiskStore {
    config: DiskConfig,
    /// Takes CUDA boundaries off the device for the writer.
    #[cfg(feature = "cuda")]
    stager: Arc<Stager>,
    next: AtomicU64,
    open: Mutex<Option<Open>>,
    /// Files handed to the writer, for [`DiskStore::flush`].
    pending: Mutex<Vec<Weak<BoundaryFile>>>,
}

#[derive(Debug)]
struct Open {
    dir: Arc<PrivateDir>,
    queue: SyncSender<Job>,
    writer: thread::JoinHandle<()>,
}

impl Drop for DiskStore {
    /// Closes the writer's queue and waits for it to finish what it was given.
    fn drop(&mut self) {
        if let Some(Open { queue, writer, .. }) = lock(&self.open).take() {
            drop(queue);
            let _ = writer.join();
        }
    }
}

impl DiskStore {
    pub(crate) fn new(config: DiskConfig) -> Self {
        Self {
            config,
            #[cfg(feature = "cuda")]
            stager: Arc::default(),
            next: AtomicU64::new(0),
            open: Mutex::new(None),
            pending: Mutex::default(),
        }
    }

    /// Copies `tensor` off its device for the writer, ordered after the kernels that wrote it:
    /// call it on the thread that queued them.
    fn payload(&self, tensor: &Tensor) -> candle_core::Result<Payload> {
        match tensor.device() {
            Device::Cpu => Ok(Payload::Host(tensor.clone())),
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => self.stager.stage(tensor).map(Payload::Pinned),
            // Another device: a blocking copy on this thread, queued behind the kernels.
            _ => tensor.to_device(&Device::Cpu).map(Payload::Host),
        }
    }

    /// The stager that takes CUDA boundaries off the device, for the stores that share it.
    #[cfg(feature = "cuda")]
    pub(crate) fn stager(&self) -> Arc<Stager> {
        Arc::clone(&self.stager)
    }

    /// Waits until every boundary handed over so far is on disk; the first failed write.
    pub(crate) fn flush(&self) -> Result<()> {
        let files: Vec<Arc<BoundaryFile>> = {
            let mut pending = lock(&self.pending);
            pending.retain(|w| w.strong_count() > 0);
            pending.iter().filter_map(Weak::upgrade).collect()
        };
        files.iter().try_for_each(|f| f.written().map(|_| ()))
    }

    /// The private directory, once the first boundary created it.
    pub(crate) fn dir(&self) -> Option<PathBuf> {
        lock(&self.open).as_ref().map(|o| o.dir.path.clone())
    }

    fn open(&self, layer: &str) -> Result<(Arc<PrivateDir>, SyncSender<Job>)> {
        let mut open = lock(&self.open);
        if let Some(o) = open.as_ref() {
            return Ok((Arc::clone(&o.dir), o.queue.clone()));
        }
        let root = &self.config.root;
        let tag = machine_tag();
        let path = root.join(format!(
            "checkpointable-{}-{:08x}-{:016x}",
            std::process::id(),
            tag.unwrap_or(0),
            unique()
        ));
        DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| Error::Disk {
                layer: layer.to_owned(),
                path: path.clone(),
                action: "create the private boundary directory",
                hint: "point the disk root at a writable directory (DiskConfig::root, `--offload-dir`)",
                source,
            })?;
        if let Some(tag) = tag {
            sweep_orphans(root, &path, tag);
        }
        let dir = Arc::new(PrivateDir { path });
        let (queue, jobs) = mpsc::sync_channel::<Job>(self.config.write_queue.max(1));
        let writer = thread::Builder::new()
            .name("checkpoint-writer".to_owned())
            .spawn(move || write_loop(&jobs))
            .map_err(|e| Error::Config(format!("cannot start the boundary writer thread: {e}")))?;
        *open = Some(Open {
            dir: Arc::clone(&dir),
            queue: queue.clone(),
            writer,
        });
        Ok((dir, queue))
    }
}

impl BoundaryStore for DiskStore {
    type Kept = DiskBoundary;
    /// Loads the files ahead of the backward pass; `None` when it takes none.
    type Reader = Option<Prefetcher>;

    /// Hands `tensor` to the writer; returns at once unless the writer is `write_queue` behind.
    fn put(&self, tensor: &Tensor, layer: &str) -> Result<DiskBoundary> {
        let (dir, queue) = self.open(layer)?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let path = dir.path.join(format!("boundary-{id:06}.safetensors"));
        let payload = self.payload(tensor).map_err(|e| Error::Disk {
            layer: layer.to_owned(),
            path: path.clone(),
            action: "copy the boundary to host memory for",
            hint: "if pinned host memory is exhausted, queue fewer boundaries for the writer \
                   (DiskConfig::write_queue) or offload fewer layers (Policy::keep_last, \
                   Policy::budget)",
            source: io::Error::other(e),
        })?;
        let (done, written) = mpsc::channel();
        let job = Job {
            payload,
            path: path.clone(),
            done,
        };
        queue.send(job).map_err(|_| Error::Disk {
            layer: layer.to_owned(),
            path: path.clone(),
            action: "queue the boundary for writing",
            hint: "the writer thread stopped; see the previous error",
            source: io::Error::other("writer thread gone"),
        })?;
        let file = Arc::new(BoundaryFile {
            path,
            layer: layer.to_owned(),
            device: tensor.device().clone(),
            written: Mutex::new(WriteState::Pending(written)),
            _dir: dir,
        });
        let mut pending = lock(&self.pending);
        // Forget files already gone before the list would grow: it stays as long as the files
        // alive at once, amortised, rather than one entry per boundary ever written.
        if pending.len() == pending.capacity() {
            pending.retain(|w| w.strong_count() > 0);
        }
        pending.push(Arc::downgrade(&file));
        drop(pending);
        Ok(DiskBoundary {
            file,
            bytes: super::tensor_bytes(tensor),
        })
    }

    fn bytes(kept: &DiskBoundary) -> u64 {
        kept.bytes
    }

    fn reader(&self, order: &[&DiskBoundary]) -> Result<Option<Prefetcher>> {
        if order.is_empty() {
            return Ok(None);
        }
        let files = order.iter().map(|d| Arc::clone(&d.file)).collect();
        Prefetcher::start(files, self.config.prefetch).map(Some)
    }

    /// The reader loads ahead on its own thread.
    fn prefetch(_kept: &DiskBoundary, _layer: &str) -> Result<()> {
        Ok(())
    }

    fn fetch(kept: DiskBoundary, reader: &Option<Prefetcher>, layer: &str) -> Result<Fetched> {
        let loaded = match reader {
            Some(reader) => reader.next(&kept.file, layer)?,
            // Not in the reader's order: load it alone.
            None => Prefetcher::start(vec![Arc::clone(&kept.file)], 1)?.next(&kept.file, layer)?,
        };
        // Dropping the boundary removes its file (the reader removed it already once read).
        drop(kept);
        Ok(Fetched {
            tensor: loaded.tensor,
            transfer: loaded.transfer,
            waited: Some(loaded.waited),
        })
    }
}

/// Which machine and process-id namespace this process lives in (a CRC-32 of the host name
/// and the pid namespace), so that a directory on a shared root is only ever judged by the
/// `/proc` that can see its process. `None` without `/proc`.
fn machine_tag() -> Option<u32> {
    let host = fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let pid_ns = fs::read_link("/proc/self/ns/pid").ok()?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(host.trim().as_bytes());
    hasher.update(b"\0");
    hasher.update(pid_ns.as_os_str().as_encoded_bytes());
    Some(hasher.finalize())
}

/// Removes the private directories that killed processes left under `root` (`SIGKILL`, or a
/// `SIGTERM` nobody handled, runs no destructor): those named like ours, with our machine
/// `tag`, owned by the user who owns `ours`, whose process is gone. Best effort: a directory
/// that cannot be removed is left as it is.
fn sweep_orphans(root: &Path, ours: &Path, tag: u32) {
    use std::os::unix::fs::MetadataExt;

    let Ok(me) = fs::metadata(ours) else {
        return;
    };
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((pid, theirs)) = name.to_str().and_then(parse_dir_name) else {
            continue;
        };
        let path = entry.path();
        let orphan = theirs == tag
            && pid != std::process::id()
            && !Path::new("/proc").join(pid.to_string()).exists()
            && fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir() && m.uid() == me.uid());
        if orphan {
            let _ = fs::remove_dir_all(&path);
        }
    }
}

/// The process id and machine tag in a private directory's name,
/// `checkpointable-<pid>-<8 hex digits>-<16 hex digits>`.
fn parse_dir_name(name: &str) -> Option<(u32, u32)> {
    let mut parts = name.strip_prefix("checkpointable-")?.split('-');
    let (pid, tag, id) = (parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if parts.next().is_some() || !hex(tag, 8) || !hex(id, 16) {
        return None;
    }
    Some((pid.parse().ok()?, u32::from_str_radix(tag, 16).ok()?))
}

fn unique() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    #[allow(clippy::cast_possible_truncation)]
    let t = t as u64;
    t.rotate_left(17) ^ n
}

fn write_loop(jobs: &Receiver<Job>) {
    while let Ok(Job {
        payload,
        path,
        done,
    }) = jobs.recv()
    {
        let started = Instant::now();
        let result = payload
            .encode()
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                // Frees the host tensor, or gives the pinned buffer back, before the write.
                drop(payload);
                write_private(&path, &bytes)
                    .map(|()| Written {
                        len: bytes.len() as u64,
                        crc: crc32fast::hash(&bytes),
                        took: started.elapsed(),
                    })
                    .map_err(|e| describe_io(&e))
            });
        // The boundary may already be gone (backward failed early): nobody to tell.
        let _ = done.send(result);
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.flush()
}

fn describe_io(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::StorageFull => format!("the disk is full ({e})"),
        io::ErrorKind::PermissionDenied => format!("permission denied ({e})"),
        _ => e.to_string(),
    }
}

enum WriteState {
    Pending(Receiver<std::result::Result<Written, String>>),
    Done(Written),
}

/// One boundary file; removed on drop.
struct BoundaryFile {
    path: PathBuf,
    layer: String,
    device: Device,
    written: Mutex<WriteState>,
    _dir: Arc<PrivateDir>,
}

impl std::fmt::Debug for BoundaryFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundaryFile")
            .field("path", &self.path)
            .field("layer", &self.layer)
            .finish_non_exhaustive()
    }
}

impl BoundaryFile {
    /// Waits for the writer to finish this file.
    fn written(&self) -> Result<Written> {
        let mut state = lock(&self.written);
        let written = match &*state {
            WriteState::Done(w) => return Ok(*w),
            WriteState::Pending(rx) => rx
                .recv()
                .map_err(|_| "the writer thread stopped before writing it".to_owned())
                .and_then(|r| r),
        };
        match written {
            Ok(w) => {
                *state = WriteState::Done(w);
                Ok(w)
            }
            Err(reason) => Err(Error::Disk {
                layer: self.layer.clone(),
                path: self.path.clone(),
                action: "write the boundary",
                hint: "free space on the disk root or point it elsewhere (DiskConfig::root, `--offload-dir`)",
                source: io::Error::other(reason),
            }),
        }
    }

    /// Reads, verifies and decodes the file (then removes it), on the compute device.
    fn load(&self) -> Result<(Tensor, Duration, u64)> {
        let expected = self.written()?;
        let started = Instant::now();
        let corrupt = |detail: String| Error::CorruptBoundary {
            layer: self.layer.clone(),
            path: self.path.clone(),
            detail,
        };
        let mut bytes = Vec::with_capacity(usize::try_from(expected.len).unwrap_or(0));
        File::open(&self.path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|source| Error::Disk {
                layer: self.layer.clone(),
                path: self.path.clone(),
                action: "read the boundary",
                hint: if source.kind() == io::ErrorKind::NotFound {
                    "the file was removed between forward and backward; keep other processes \
                     (tmp cleaners) out of the disk root and run the step again"
                } else {
                    "check the disk root and run the step again"
                },
                source,
            })?;
        if bytes.len() as u64 != expected.len {
            return Err(corrupt(format!(
                "truncated: {} bytes on disk, {} written",
                bytes.len(),
                expected.len
            )));
        }
        let crc = crc32fast::hash(&bytes);
        if crc != expected.crc {
            return Err(corrupt(format!(
                "checksum mismatch: CRC-32 {crc:08x} on disk, {:08x} written",
                expected.crc
            )));
        }
        let tensor = file::decode(&bytes, &Device::Cpu).map_err(|e| corrupt(e.to_string()))?;
        let _ = fs::remove_file(&self.path);
        Ok((tensor, expected.took + started.elapsed(), expected.len))
    }
}

impl Drop for BoundaryFile {
    fn drop(&mut self) {
        // Let the writer finish first, or the file would appear after its removal.
        let _ = self.written();
        let _ = fs::remove_file(&self.path);
    }
}

/// A boundary handed to the disk store.
#[derive(Debug)]
pub(crate) struct DiskBoundary {
    file: Arc<BoundaryFile>,
    bytes: u64,
}

/// One loaded boundary: the tensor, the time its transfer took, whether it was ready.
struct Loaded {
    tensor: Tensor,
    transfer: Duration,
    waited: bool,
}

/// What the reader thread sends for one file: the file it read, and its tensor or error.
type ReadFile = (PathBuf, Result<(Tensor, Duration)>);

/// Loads boundary files in the order backward needs them, `depth` ahead, on a thread.
pub(crate) struct Prefetcher {
    rx: Option<Receiver<ReadFile>>,
    thread: Option<thread::JoinHandle<()>>,
    device: Option<Device>,
}

impl Drop for Prefetcher {
    /// Stops the thread and waits for it, so that every file it still held is removed before
    /// the backward returns (on success, error or panic).
    fn drop(&mut self) {
        drop(self.rx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Prefetcher {
    /// Starts loading `files` (in the order they will be taken).
    fn start(files: Vec<Arc<BoundaryFile>>, depth: usize) -> Result<Self> {
        let device = files.first().map(|f| f.device.clone());
        let (tx, rx) = mpsc::sync_channel(depth.max(1));
        let thread = thread::Builder::new()
            .name("checkpoint-prefetch".to_owned())
            .spawn(move || {
                for f in files {
                    let loaded = f.load().map(|(t, took, _)| (t, took));
                    let failed = loaded.is_err();
                    let path = f.path.clone();
                    drop(f);
                    if tx.send((path, loaded)).is_err() || failed {
                        break; // backward stopped, or nothing after a failure matters
                    }
                }
            })
            .map_err(|e| Error::Config(format!("cannot start the prefetch thread: {e}")))?;
        Ok(Self {
            rx: Some(rx),
            thread: Some(thread),
            device,
        })
    }

    /// The next boundary, which must be `file`, on its compute device.
    fn next(&self, file: &BoundaryFile, layer: &str) -> Result<Loaded> {
        let gone = || Error::Config(format!("internal: the prefetch thread is gone ({layer})"));
        let rx = self.rx.as_ref().ok_or_else(gone)?;
        let (result, waited) = match rx.try_recv() {
            Ok(r) => (r, false),
            Err(_) => (
                rx.recv().map_err(|_| {
                    Error::Config(format!(
                        "internal: the prefetch thread ended before the boundary of {layer}"
                    ))
                })?,
                true,
            ),
        };
        let (path, result) = result;
        if path != file.path {
            return Err(Error::Config(format!(
                "internal: the backward of {layer} needs {} but the reader loaded {}",
                file.path.display(),
                path.display()
            )));
        }
        let (tensor, mut transfer) = result?;
        let started = Instant::now();
        let tensor = match &self.device {
            Some(dev) if !dev.is_cpu() => tensor.to_device(dev)?,
            _ => tensor,
        };
        transfer += started.elapsed();
        Ok(Loaded {
            tensor,
            transfer,
            waited,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The list of files handed to the writer stays as long as the files alive at once, not
    /// one entry per boundary ever written.
    #[test]
    fn the_pending_list_does_not_grow_with_the_steps() -> Result<()> {
        let store = DiskStore::new(DiskConfig::default());
        let t = Tensor::zeros(16, candle_core::DType::F32, &Device::Cpu)?;
        let mut longest = 0;
        for step in 0..2000 {
            let kept = store.put(&t, &format!("step {step}"))?;
            longest = longest.max(store.pending.lock().map_or(0, |p| p.len()));
            drop(kept);
        }
        // Without pruning it would hold 2000; pruned when full, it stays at its first capacity.
        assert!(longest <= 8, "{longest} entries for at most 1 live file");
        Ok(())
    }

    #[test]
    fn private_directories_are_recognised_by_name() {
        let parse = parse_dir_name;
        assert_eq!(
            parse("checkpointable-4242-0000beef-00ff00ff00ff00ff"),
            Some((4242, 0xbeef))
        );
        assert_eq!(parse("checkpointable-4242-00ff00ff00ff00ff"), None);
        assert_eq!(parse("checkpointable-4242-0000beef-00ff"), None);
        assert_eq!(parse("checkpointable-x-0000beef-00ff00ff00ff00ff"), None);
        assert_eq!(parse("checkpointable-4242-0000beeg-00ff00ff00ff00ff"), None);
        assert_eq!(
            parse("checkpointable-4242-0000beef-00ff00ff00ff00ff-x"),
            None
        );
        assert_eq!(parse("other-4242-0000beef-00ff00ff00ff00ff"), None);
    }
}
