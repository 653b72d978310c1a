"""What this machine is, and how much memory a run takes on it, without torch.

    describe("cuda")      -> {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", ...}
    jetson_info()         -> {"model": "NVIDIA Jetson AGX Orin Developer Kit", "l4t": "R36.3.0", "power_mode": "MAXN"}
    MemorySampler()       -> peak host RSS and peak device memory of a stretch of work
    copy_bandwidth()      -> device-to-device copy bandwidth (bytes read + written per second), through libcudart

Desktop GPUs: NVML (libnvidia-ml, the driver's library) through ctypes, or pynvml when importable.
Jetson boards have no NVML: the GPU shares the host's memory, so device memory is reported as unified
memory in use (/proc/meminfo: MemTotal - MemAvailable; tegrastats is not needed for that).
Every function returns None (or leaves a field out) where the information is not available here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import re
import shutil
import subprocess
import threading
from pathlib import Path

_DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
_TEGRA_RELEASE = Path("/etc/nv_tegra_release")
_NVPMODEL_STATUS = Path("/var/lib/nvpmodel/status")


# -- Jetson ---------------------------------------------------------------------------------------

def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", "replace").replace("\x00", "").strip()
    except OSError:
        return None


def parse_tegra_release(text: str) -> str | None:
    """'# R36 (release), REVISION: 3.0, GCID: ...' -> 'R36.3.0'."""
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text or "")
    return f"R{match.group(1)}.{match.group(2)}" if match else None


def parse_nvpmodel(text: str) -> str | None:
    """`nvpmodel -q` prints 'NV Power Mode: MAXN' (then the mode's number)."""
    match = re.search(r"NV Power Mode:\s*(\S+)", text or "")
    return match.group(1) if match else None


def jetson_info(root: Path = Path("/")) -> dict | None:
    """Model, L4T release and power mode of a Jetson board; None on anything else. `root` is for tests."""
    model = _read(root / _DEVICE_TREE_MODEL.relative_to("/"))
    release_text = _read(root / _TEGRA_RELEASE.relative_to("/"))
    if not release_text and not (model and "jetson" in model.lower()):
        return None
    info = {"model": model, "l4t": parse_tegra_release(release_text or "")}
    power = None
    if root == Path("/") and shutil.which("nvpmodel"):
        try:
            out = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=3)
            power = parse_nvpmodel(out.stdout)
        except (OSError, subprocess.SubprocessError):
            power = None
    if power is None:
        status = _read(root / _NVPMODEL_STATUS.relative_to("/"))  # 'pmode:0000 fmode:...': the mode's number
        match = re.search(r"pmode:(\d+)", status or "")
        power = f"mode {int(match.group(1))}" if match else None
    info["power_mode"] = power
    return info


def meminfo_used_bytes(text: str | None = None) -> int | None:
    """MemTotal - MemAvailable from /proc/meminfo: on a Jetson, the CPU's and the GPU's memory together."""
    text = _read(Path("/proc/meminfo")) if text is None else text
    if not text:
        return None
    values = {k: int(v) * 1024 for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.M)}
    if "MemTotal" not in values or "MemAvailable" not in values:
        return None
    return values["MemTotal"] - values["MemAvailable"]


# -- NVML -----------------------------------------------------------------------------------------

class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class Nvml:
    """The few NVML calls needed here, on the GPU with CUDA ordinal `index` (CUDA_VISIBLE_DEVICES honoured
    when it lists plain numbers)."""

    def __init__(self, index: int = 0):
        self.lib = None
        for name in ("libnvidia-ml.so.1", ctypes.util.find_library("nvidia-ml") or "", "nvml.dll"):
            if not name:
                continue
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if self.lib is None or self.lib.nvmlInit_v2() != 0:
            raise OSError("NVML is not available")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        ordinals = [int(v) for v in visible.split(",") if v.strip().isdigit()]
        physical = ordinals[index] if index < len(ordinals) else index
        self.handle = ctypes.c_void_p()
        if self.lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(physical), ctypes.byref(self.handle)) != 0:
            raise OSError(f"NVML has no GPU {physical}")

    def name(self) -> str:
        buf = ctypes.create_string_buffer(96)
        self.lib.nvmlDeviceGetName(self.handle, buf, ctypes.c_uint(96))
        return buf.value.decode()

    def compute_capability(self) -> str | None:
        major, minor = ctypes.c_int(), ctypes.c_int()
        if self.lib.nvmlDeviceGetCudaComputeCapability(self.handle, ctypes.byref(major), ctypes.byref(minor)) != 0:
            return None
        return f"{major.value}.{minor.value}"

    def memory(self) -> tuple[int, int]:
        """(used, total) bytes on the whole GPU (every process)."""
        mem = _NvmlMemory()
        self.lib.nvmlDeviceGetMemoryInfo(self.handle, ctypes.byref(mem))
        return int(mem.used), int(mem.total)

    def driver(self) -> str | None:
        buf = ctypes.create_string_buffer(80)
        if self.lib.nvmlSystemGetDriverVersion(buf, ctypes.c_uint(80)) != 0:
            return None
        return buf.value.decode()


def nvml(index: int = 0) -> Nvml | None:
    try:
        return Nvml(index)
    except (OSError, AttributeError):
        return None


def process_gpu_memory(pid: int | None = None) -> int | None:
    """Bytes of GPU memory held by process `pid` (default: this one), from nvidia-smi's per-process list;
    None where nvidia-smi is absent or does not list the process (a Jetson, a PID namespace)."""
    if shutil.which("nvidia-smi") is None:
        return None
    pid = os.getpid() if pid is None else pid
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = [int(m) for p, m in re.findall(r"^\s*(\d+)\s*,\s*(\d+)", out, re.M) if int(p) == pid]
    return sum(used) * 2**20 if used else None


# -- the whole picture ----------------------------------------------------------------------------

def cpu_name() -> str:
    text = _read(Path("/proc/cpuinfo")) or ""
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return match.group(1).strip() if match else (platform.processor() or platform.machine())


def describe(device: str = "cpu", index: int = 0) -> dict:
    """The machine a bench ran on: CPU always; the GPU (NVML) or the Jetson board when the device is one."""
    info = {"kind": "cpu", "cpu": cpu_name(), "cpu_count": os.cpu_count(), "machine": platform.machine()}
    jetson = jetson_info()
    if jetson is not None:
        info.update(kind="jetson" if device != "cpu" else "cpu", jetson=jetson, name=jetson.get("model"),
                    memory="unified (/proc/meminfo)")
        return info
    if device != "cpu":
        gpu = nvml(index)
        if gpu is not None:
            used, total = gpu.memory()
            info.update(kind="cuda", name=gpu.name(), compute_capability=gpu.compute_capability(),
                        driver=gpu.driver(), total_memory_mb=round(total / 2**20), memory="nvml")
        else:
            info.update(kind="cuda", name=None, memory=None)
    if info["kind"] == "cpu":
        info["name"] = info["cpu"]
    return info


def gpu_identity(index: int = 0) -> tuple[str, str] | None:
    """(GPU name, compute capability) for engine cache keys, or None where NVML is absent."""
    gpu = nvml(index)
    if gpu is None:
        return None
    return gpu.name(), gpu.compute_capability() or "unknown"


# -- memory over a stretch of work ----------------------------------------------------------------

def host_rss_bytes() -> tuple[int | None, int | None]:
    """(current RSS, peak RSS = VmHWM) of this process, from /proc/self/status."""
    text = _read(Path("/proc/self/status")) or ""
    rss = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    hwm = re.search(r"^VmHWM:\s+(\d+) kB", text, re.M)
    return (int(rss.group(1)) * 1024 if rss else None, int(hwm.group(1)) * 1024 if hwm else None)


class MemorySampler:
    """Polls host RSS and device memory in threads; `peaks()` after `stop()`.

    Device memory, in order of preference: this process's own GPU memory (nvidia-smi's per-process list,
    polled every 0.2 s: other jobs on the GPU do not count), NVML's `used` for the whole GPU (polled every
    few ms), or unified memory in use on a Jetson (/proc/meminfo). The whole-GPU figure before the work is
    reported as the baseline."""

    def __init__(self, device: str = "cpu", index: int = 0, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.source = None
        self._read_device = None
        self._process = None
        if device != "cpu":
            if jetson_info() is not None:
                self.source, self._read_device = "meminfo (unified)", meminfo_used_bytes
            else:
                gpu = nvml(index)
                if gpu is not None:
                    self.source, self._read_device = "nvml (whole GPU)", lambda: gpu.memory()[0]
                if shutil.which("nvidia-smi"):
                    self._process = 0
        self.device_baseline = self._read_device() if self._read_device else None
        self.device_peak = self.device_baseline
        self.host_peak = host_rss_bytes()[0]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True)]
        if self._process is not None:
            self._threads.append(threading.Thread(target=self._run_process, daemon=True))

    def _sample(self) -> None:
        if self._read_device is not None:
            value = self._read_device()
            if value is not None:
                self.device_peak = max(self.device_peak or 0, value)
        rss = host_rss_bytes()[0]
        if rss is not None:
            self.host_peak = max(self.host_peak or 0, rss)

    def _sample_process(self) -> None:
        value = process_gpu_memory()
        if value is not None:
            self._process = max(self._process or 0, value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _run_process(self) -> None:
        while not self._stop.wait(0.2):
            self._sample_process()

    def __enter__(self) -> "MemorySampler":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self._process is not None:
            self._sample_process()  # before anything is released
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join()
        self._sample()

    def peaks(self) -> dict:
        mb = (lambda b: None if b is None else round(b / 2**20, 1))
        hwm = host_rss_bytes()[1]
        process = self._process or None
        return {"host_peak_rss_mb": mb(max(filter(None, [self.host_peak, hwm]), default=None)),
                "device_peak_mb": mb(process if process else self.device_peak),
                "device_source": "nvidia-smi (this process)" if process else self.source,
                "device_total_peak_mb": mb(self.device_peak), "device_baseline_mb": mb(self.device_baseline)}


# -- bandwidth ------------------------------------------------------------------------------------

def _cudart():
    names = ["libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"]
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    # pip's nvidia-cuda-runtime wheels (what onnxruntime-gpu and torch load) keep it under site-packages
    import site
    import sys

    roots = [Path(p) for p in (site.getsitepackages() + [site.getusersitepackages()] + sys.path) if p]
    for root in roots:
        for path in sorted(root.glob("nvidia/*/lib/libcudart.so*")) + sorted(root.glob("nvidia/cuda_runtime/lib/libcudart.so*")):
            try:
                return ctypes.CDLL(str(path))
            except OSError:
                continue
    return None


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 20) -> float | None:
    """Device-to-device cudaMemcpy bandwidth in bytes/s, counting bytes read + written (2 x nbytes per
    copy), timed with CUDA events after a warm-up. None where libcudart or a GPU is absent."""
    rt = _cudart()
    if rt is None:
        return None
    src, dst = ctypes.c_void_p(), ctypes.c_void_p()
    start, stop = ctypes.c_void_p(), ctypes.c_void_p()
    size = ctypes.c_size_t(nbytes)
    try:
        if rt.cudaMalloc(ctypes.byref(src), size) or rt.cudaMalloc(ctypes.byref(dst), size):
            return None
        rt.cudaMemset(src, 0x5A, size)  # not zeros
        d2d = 3  # cudaMemcpyDeviceToDevice
        for _ in range(3):
            rt.cudaMemcpy(dst, src, size, d2d)
        rt.cudaDeviceSynchronize()
        rt.cudaEventCreate(ctypes.byref(start))
        rt.cudaEventCreate(ctypes.byref(stop))
        rt.cudaEventRecord(start, None)
        for _ in range(repeats):
            rt.cudaMemcpyAsync(dst, src, size, d2d, None)
        rt.cudaEventRecord(stop, None)
        rt.cudaEventSynchronize(stop)
        ms = ctypes.c_float()
        if rt.cudaEventElapsedTime(ctypes.byref(ms), start, stop) or ms.value <= 0:
            return None
        return 2 * nbytes * repeats / (ms.value / 1000.0)
    finally:
        for ptr in (src, dst):
            if ptr.value:
                rt.cudaFree(ptr)
        for event in (start, stop):
            if event.value:
                rt.cudaEventDestroy(event)

