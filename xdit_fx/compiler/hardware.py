"""Hardware profiles for the plan cost model: achievable compute rates, memory, links; data, each with its source.

A profile describes one device and the links between devices:

* compute: for matmul-class nodes (linear, matmul, conv) and for attention, ``time = overhead + flops / rate``;
  for every other node that moves data, ``time = overhead + bytes / mem_bw``; views cost ``view_overhead``.
  The overheads stand for the per-op launch/dispatch cost, which dominates small kernels.
* links: ``intra`` (devices in one node: NVLink, PCIe, or loopback for CPU processes) and ``inter`` (between
  nodes). A message costs ``latency + bytes / bandwidth`` (bandwidth per direction, per device, as a collective
  achieves it, not the marketing figure). ``gpus_per_node`` decides which mesh axes cross nodes.
* host time: every executed graph node also costs ``node_overhead`` on the host beyond its op's own time (the
  GraphModule's generated forward, the Python around the call), and every runtime op the rewrite inserts (a
  collective, ring attention, PipeFusion's per-patch ops and patch loop) ``runtime_op_overhead``; where the
  host runs ahead of the device (``host_async``: CUDA streams) host time shows only where it exceeds the
  device time of the same call, on CPUs it adds to it.
* ``act`` (transcendental elementwise and normalisation ops: gelu, silu, softmax, layer_norm, ...): their own
  measured curve where present (a CPU computes them far below its memory bandwidth), else the ``mem`` class.
* ``ring_overlap``: the fraction of ring attention's P2P time hidden behind its chunk compute (1: the transfer
  runs beside the compute, as on GPUs with a side stream; 0: not at all).

Profiles ship as data in `PROFILES`; `xdit-fx calibrate-hardware` measures this machine and writes a JSON file
that `load_profile` reads. Every value carries its source in `sources`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from xdit_fx.errors import XditFxError

GB = 1e9
TF = 1e12


def interpolate(points: "tuple | list", x: float) -> float:
    """Seconds at size `x` from measured (size, seconds) points: log-log interpolation between them, the first
    point's time below them (overhead-bound), proportional to size above them (throughput-bound)."""
    pts = sorted((float(a), float(b)) for a, b in points)
    if x <= pts[0][0]:
        return pts[0][1]
    if x >= pts[-1][0]:
        return pts[-1][1] * x / pts[-1][0]
    for (x0, t0), (x1, t1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            f = math.log(x / x0) / math.log(x1 / x0)
            return math.exp(math.log(t0) + f * (math.log(t1) - math.log(t0)))
    return pts[-1][1]


@dataclass(frozen=True)
class Link:
    """A link between two devices: achievable bandwidth per direction (bytes/s) and latency per message (s);
    or, when `points` holds measured (bytes, seconds) of one message, those interpolated."""

    bandwidth: float
    latency: float
    points: tuple = ()
    #: extra seconds per message when the ranks have been computing in between (a peer that lost its core
    #: to another job must be scheduled again first): 0 with a device per rank, measured on shared CPUs
    sync: float = 0.0

    def time(self, nbytes: float, messages: int = 1) -> float:
        if self.points:
            return messages * (interpolate(self.points, nbytes / max(messages, 1)) + self.sync)
        return messages * (self.latency + self.sync) + nbytes / self.bandwidth


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    gemm_rate: float            # FLOP/s achievable on large linears / matmuls / convs in the model's dtype
    attn_rate: float            # FLOP/s achievable by the attention kernel (SDPA / flash) on long sequences
    mem_bw: float               # bytes/s achievable by elementwise / norm kernels
    op_overhead: float          # s per non-view op (launch / dispatch)
    view_overhead: float        # s per view op
    memory: float               # bytes of device memory usable by one rank
    intra: Link                 # between devices of one node
    inter: Link                 # between nodes
    gpus_per_node: int = 8
    ring_overlap: float = 1.0
    #: compute speed of a rank while the others wait (PipeFusion's fill and drain) over its speed while all
    #: compute: 1 with a device per rank; above 1 where ranks share CPU cores or memory bandwidth
    solo_speedup: float = 1.0
    gemm_overhead: float = 0.0  # extra s per matmul-class call beyond op_overhead (small-GEMM inefficiency)
    attn_overhead: float = 0.0  # extra s per attention call
    #: measured (size, seconds) per op class (gemm, attn: FLOPs; mem: bytes) used instead of the affine
    #: rates where present: a CPU's rate depends on whether the operands fit its caches
    curves: dict[str, list] = field(default_factory=dict)
    #: host s per executed graph node beyond its op's own time (the op's dispatch is in the curves/overheads)
    node_overhead: float = 0.0
    #: host s per call of a runtime op (torch.library custom op, PipeFusion's per-patch Python ops) beyond
    #: the kernels it runs
    runtime_op_overhead: float = 0.0
    #: the host enqueues work ahead of the device (CUDA): host time hides behind device time
    host_async: bool = False
    sources: dict[str, str] = field(default_factory=dict)

    def op_time(self, kind: str, size: float, rate: float, overhead: float) -> float:
        """Seconds of one op of class `kind` (gemm, attn, mem) of `size` FLOPs (bytes for mem)."""
        if kind == "act" and kind not in self.curves:
            kind = "mem"
        if kind in self.curves:
            return interpolate(self.curves[kind], size)
        return overhead + size / rate

    def host_time(self, host: float, device: float) -> float:
        """Seconds that `host` seconds of host work add to a call whose device work takes `device` seconds."""
        return max(0.0, host - device) if self.host_async else host

    def link(self, crosses_nodes: bool) -> Link:
        return self.inter if crosses_nodes else self.intra

    def with_nodes(self, nodes: int, world_size: int) -> "HardwareProfile":
        """This profile with `world_size` ranks spread over `nodes` nodes (gpus_per_node = world / nodes)."""
        if nodes <= 1:
            return dataclasses.replace(self, gpus_per_node=max(self.gpus_per_node, world_size))
        if world_size % nodes:
            raise XditFxError(f"--nodes {nodes} does not divide the world size {world_size}")
        return dataclasses.replace(self, gpus_per_node=world_size // nodes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HardwareProfile":
        data = dict(data)
        for key in ("intra", "inter"):
            if isinstance(data.get(key), dict):
                link = dict(data[key])
                link["points"] = tuple(tuple(p) for p in link.get("points", ()))
                data[key] = Link(**link)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise XditFxError(f"hardware profile: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


_NV = "NVIDIA datasheet"
_ACH = ("achievable fraction assumed: 0.6 of dense peak for large bf16 GEMMs, 0.45 for flash attention "
        "(FlashAttention-2 paper, Dao 2023: 50-73% of peak on A100; FA2 on H100 ~35-50%)")
_OVH = "per-kernel launch ~5 us incl. framework dispatch (eager PyTorch; CUDA launch 2-4 us + dispatch)"
_HOST = ("eager PyTorch spends ~5-25 us of CPU time per op before its kernel (Python, pybind, dispatcher, "
         "launch; J. Lin, 'From PyTorch op to kernel launch', gpu_kernel_serving lesson 18); 10 us per fx node "
         "run eagerly, hidden behind the device while the GPU is busy (host_async)")
_RT = ("a torch.library custom op's Python path (schema parse, dispatch through the Python kernel): 15-20 us "
       "measured on the repository's CPU VM (`xdit-fx calibrate-hardware`), host-side like _HOST")
_NCCL = ("NCCL all-to-all / P2P bus bandwidth, nccl-tests order of magnitude: ~70% of the link's per-direction "
         "figure; latency ~20 us intra-node, ~30 us inter-node")


def _gpu(name: str, dense_bf16_tf: float, hbm_tb: float, mem_gb: float, link_gb: float, link_src: str,
         inter_gb: float = 50.0, per_node: int = 8, extra: dict[str, str] | None = None) -> HardwareProfile:
    sources = {
        "gemm_rate": f"{_NV}: {dense_bf16_tf:g} TFLOP/s dense BF16 x 0.6 ({_ACH})",
        "attn_rate": f"{_NV}: {dense_bf16_tf:g} TFLOP/s dense BF16 x 0.45 ({_ACH})",
        "mem_bw": f"{_NV}: {hbm_tb:g} TB/s memory bandwidth x 0.8 achievable",
        "memory": f"{_NV}: {mem_gb:g} GB",
        "op_overhead": _OVH, "view_overhead": "PyTorch view dispatch ~2 us",
        "intra": f"{link_src}; {_NCCL}",
        "inter": f"{inter_gb:g} GB/s per GPU (one 400 Gb/s NDR InfiniBand NIC per GPU); {_NCCL}",
        "gpus_per_node": f"{per_node} GPUs per node (HGX/typical server)",
        "ring_overlap": "ring P2P on a side stream overlaps the chunk's attention kernel",
        "solo_speedup": "one GPU per rank: a waiting rank does not speed up the others",
        "node_overhead": _HOST, "runtime_op_overhead": _RT,
        "host_async": "CUDA kernels are enqueued asynchronously: the host runs ahead of the device",
    }
    sources.update(extra or {})
    return HardwareProfile(
        name=name, gemm_rate=0.6 * dense_bf16_tf * TF, attn_rate=0.45 * dense_bf16_tf * TF, mem_bw=0.8 * hbm_tb * 1e12,
        op_overhead=5e-6, view_overhead=2e-6, memory=mem_gb * GB * 0.95,
        intra=Link(0.7 * link_gb * GB, 20e-6), inter=Link(0.7 * inter_gb * GB, 30e-6), gpus_per_node=per_node,
        ring_overlap=1.0, node_overhead=10e-6, runtime_op_overhead=20e-6, host_async=True, sources=sources)


#: measured on this repository's 2-core CPU VM by `xdit-fx calibrate-hardware` (see benchmarks/results/
#: cpu_gloo_profile.json); one torch thread per rank, fp32, gloo over loopback
CPU_GLOO_FILE = os.path.join(os.path.dirname(__file__), "profiles", "cpu-gloo.json")

PROFILES: dict[str, HardwareProfile] = {
    "h100-nvlink": _gpu("h100-nvlink", 989, 3.35, 80, 450, "NVLink 4: 900 GB/s bidirectional = 450 GB/s per "
                        "direction (H100 SXM datasheet)"),
    "h100-pcie": _gpu("h100-pcie", 756, 2.0, 80, 64, "PCIe Gen5 x16: 64 GB/s per direction (H100 PCIe datasheet)"),
    "h200": _gpu("h200", 989, 4.8, 141, 450, "NVLink 4: 900 GB/s bidirectional (H200 SXM datasheet)"),
    "l40": _gpu("l40", 181, 0.864, 48, 32, "PCIe Gen4 x16: 32 GB/s per direction, no NVLink (L40 datasheet); "
                "xDiT's flux.md notes 8xL40 cross QPI", inter_gb=12.5),
    "b200": _gpu("b200", 2250, 8.0, 180, 900, "NVLink 5: 1.8 TB/s bidirectional = 900 GB/s per direction "
                 "(B200 / HGX B200 datasheet)"),
    "a100-nvlink": _gpu("a100-nvlink", 312, 2.0, 80, 300, "NVLink 3: 600 GB/s bidirectional = 300 GB/s per "
                        "direction (A100 SXM 80GB datasheet)", inter_gb=25.0),
}


def profile_names() -> list[str]:
    names = sorted(PROFILES)
    if os.path.exists(CPU_GLOO_FILE):
        names.insert(0, "cpu-gloo")
    return names


def load_profile(spec: "str | HardwareProfile | None") -> HardwareProfile:
    """A profile by name (`PROFILES`, or `cpu-gloo`: the calibrated file shipped with the package), or a JSON
    file written by `xdit-fx calibrate-hardware`. None: `cpu-gloo`."""
    if isinstance(spec, HardwareProfile):
        return spec
    spec = spec or "cpu-gloo"
    if spec in PROFILES:
        return PROFILES[spec]
    path = CPU_GLOO_FILE if spec == "cpu-gloo" else spec
    if not os.path.exists(path):
        raise XditFxError(f"hardware {spec!r}: not a profile name ({', '.join(profile_names())}) nor a JSON file "
                          f"(write one with `xdit-fx calibrate-hardware --out FILE`)")
    try:
        with open(path) as f:
            return HardwareProfile.from_dict(json.load(f))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise XditFxError(f"hardware profile {path!r}: {e}") from None
