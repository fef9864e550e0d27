"""Compile mlx_hermes/cuda_*.py's kernels for Hopper on any machine, no GPU:
catches compile errors and shows registers and spills before a device run.

    pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 nvidia-cuda-cccl-cu12 \
        nvidia-cuda-nvcc-cu12
    python benchmarks/compile_cuda_kernels.py [--arch sm_90]
        [--sass KERNEL [--set TILES=1 ...]]   # needs: pip install nvidia-cuda-nvdisasm

Each kernel body is wrapped the way `mx.fast.cuda_kernel` wraps it (typed
input pointers, template arguments as ints) at the 8x7B shapes, compiled
with NVRTC, and its PTX assembled with ptxas for the resource report. MLX's
own preamble is not included, so a kernel that passes here can still fail on
names only MLX defines; it has caught every typo so far, at no device time.
Prints a table and JSON.

--sass KERNEL disassembles that kernel (nvdisasm) and prints, for each loop
that runs mma instructions, its instruction count by opcode: what a change
to the inner loop costs, read here before timing it on a GPU (gate_up's
loop: 595 -> 424 instructions for two steps of two tiles, 2026-11-28).
--set NAME=VALUE changes a template argument (e.g. TILES=1).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_hermes import cuda_attention, cuda_grouped, cuda_layer, cuda_prefill, cuda_qmv  # noqa: E402

BF16, U32, F32, I32 = "__nv_bfloat16", "uint32_t", "float", "int32_t"
QMV, GROUPED = cuda_qmv.HEADER, cuda_qmv.HEADER + cuda_grouped.HEADER
# name, header, inputs with their types, outputs with theirs, body, template arguments
# (8x7B, 4-bit, group 64; the grouped kernels at 32 streams)
KERNELS = [
    ("gate_up_swiglu", QMV, [("x", BF16), ("w", U32), ("scales", BF16), ("biases", BF16),
                             ("logits", BF16)], [("h", BF16)], cuda_qmv.GATE_UP_SWIGLU,
     {"F": 14336, "K": 4096, "GS": 64, "NC": 2, "KC": 2, "E": 8, "R": cuda_qmv.GATE_UP_ROWS}),
    ("down_combine", QMV, [("h", BF16), ("w", U32), ("scales", BF16), ("biases", BF16),
                           ("logits", BF16), ("res", BF16)], [("y", BF16)],
     cuda_qmv.DOWN_COMBINE,
     {"D": 4096, "K": 14336, "GS": 64, "NT": 1, "KC": 2, "E": 8, "R": cuda_qmv.DOWN_ROWS,
      "RES": True}),
    ("grouped_gate_up", GROUPED, [("x", BF16), ("w", U32), ("scales", BF16), ("biases", BF16),
                                  ("logits", BF16)], [("h", BF16)], cuda_grouped.GATE_UP,
     {"F": 14336, "K": 4096, "GS": 64, "TILES": 2, "KC": 2, "E": 8,
      "U": cuda_grouped.UNROLL["gate_up"]}),
    ("grouped_down", GROUPED, [("h", BF16), ("w", U32), ("scales", BF16), ("biases", BF16),
                               ("logits", BF16)], [("y", F32)], cuda_grouped.DOWN,
     {"D": 4096, "K": 14336, "GS": 64, "TILES": 2, "KC": 2, "E": 8, "S": 4, "RT": 1,
      "U": cuda_grouped.UNROLL["down"]}),
    ("grouped_combine", GROUPED, [("p", F32), ("res", BF16)], [("y", BF16)],
     cuda_grouped.COMBINE, {"D": 4096, "KC": 2, "RES": True}),
    ("grouped_linear", GROUPED, [("x", BF16), ("w", U32), ("scales", BF16), ("biases", BF16)],
     [("y", BF16)], cuda_grouped.LINEAR,
     {"N": 6144, "K": 4096, "GS": 64, "TILES": 4, "S": 8, "RT": 1,
      "U": cuda_grouped.UNROLL["linear"]}),
    ("batch_attend", cuda_qmv.HEADER, [("q", BF16), ("k", BF16), ("v", BF16), ("lp", I32)],
     [("o", BF16)], cuda_attention.ATTEND,
     {"H": 32, "KH": 8, "DH": 128, "NW": cuda_attention.WARPS}),
    ("add_rms_norm", cuda_qmv.HEADER, [("x", BF16), ("a", BF16), ("w", BF16)],
     [("h", BF16), ("n", BF16)], cuda_layer.ADD_RMS_NORM,
     {"D": 4096, "EPS": cuda_layer._float_bits(1e-5)}),
    ("prefill_gemm", GROUPED + cuda_prefill.HEADER,
     [("x", BF16), ("idx", U32), ("w", U32), ("scales", BF16), ("biases", BF16)],
     [("y", BF16)], cuda_prefill.GEMM,
     {"E": 8, "NTOT": 28672, "A": 0, "NS": 28672, "K": 4096, "GS": 64, "MT": 4,
      "GROUPED": True}),
]


def cuda_root() -> Path:
    try:
        import nvidia.cuda_nvrtc
    except ImportError:
        sys.exit("error: NVRTC is not installed: pip install nvidia-cuda-nvrtc-cu12 "
                 "nvidia-cuda-runtime-cu12 nvidia-cuda-cccl-cu12 nvidia-cuda-nvcc-cu12")
    return Path(list(nvidia.cuda_nvrtc.__path__)[0]).parent


def source(name: str, header: str, inputs: list, outputs: list, body: str,
           template: dict) -> str:
    params = []
    for n, t in inputs:
        params.append(f"const {t}* __restrict__ {n}")
        # shapes MLX passes where the body names them (as Shape, its fixed-size array)
        params += [f"const __grid_constant__ Shape {n}_shape"] * (f"{n}_shape" in body)
        params += [f"const __grid_constant__ Strides {n}_strides"] * (f"{n}_strides" in body)
        params += [f"const __grid_constant__ int {n}_ndim"] * (f"{n}_ndim" in body)
    params = ", ".join(params + [f"{t}* __restrict__ {n}" for n, t in outputs])
    values = ", ".join(str(int(v)) for v in template.values())
    return ("#include <cuda_bf16.h>\n#include <cuda/std/cstdint>\n#include <cuda/std/array>\n"
            "using cuda::std::uint32_t;\nusing Shape = cuda::std::array<int32_t, 8>;\n"
            "using Strides = cuda::std::array<int64_t, 8>;\n"
            + header
            + f"\ntemplate <{', '.join(f'int {k}' for k in template)}>\n"
            f"__global__ void {name}({params}) {{\n{body}\n}}\n"
            f"template __global__ void {name}<{values}>({params});\n")


def compile_ptx(nvrtc, root: Path, src: str, arch: str) -> tuple[int, str, bytes]:
    prog = ctypes.c_void_p()
    nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"kernel.cu", 0, None, None)
    opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17",
            f"-I{root / 'cuda_runtime' / 'include'}".encode(),
            f"-I{root / 'cuda_cccl' / 'include'}".encode()]
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    ptx = b""
    if rc == 0:
        nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetPTX(prog, buf)
        ptx = buf.value
    return rc, log.value.decode(errors="replace"), ptx


def mma_loops(sass: str) -> list[tuple[int, Counter]]:
    """Each loop (a branch back to a label) of the disassembly that holds an
    HMMA: its instructions counted by opcode."""
    labels, code = {}, []
    for line in sass.splitlines():
        label = re.match(r"^\.(L_x_\d+):", line.strip())
        if label:
            labels[label.group(1)] = len(code)
            continue
        ins = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if ins:
            code.append(re.sub(r"^@!?U?P\w+\s+", "", ins.group(1).strip()))
    loops = []
    for i, ins in enumerate(code):
        back = re.search(r"BRA `\(\.(L_x_\d+)\)", ins)
        if back and labels.get(back.group(1), i + 1) <= i:
            body = code[labels[back.group(1)]:i + 1]
            if any(b.startswith("HMMA") for b in body):
                loops.append((len(body), Counter(b.split()[0].split(".")[0] for b in body)))
    return loops


def show_sass(cubin: Path, name: str) -> None:
    import shutil

    tool = shutil.which("nvdisasm")
    if tool is None:
        try:
            import nvidia.cu13

            tool = str(Path(list(nvidia.cu13.__path__)[0]) / "bin" / "nvdisasm")
        except ImportError:
            sys.exit("error: nvdisasm not found: pip install nvidia-cuda-nvdisasm")
    sass = subprocess.run([tool, "-c", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    for size, ops in sorted(mma_loops(sass), key=lambda loop: loop[0]):
        top = ", ".join(f"{op} {n}" for op, n in ops.most_common(12))
        print(f"{name}: a loop of {size} instructions, HMMA {ops['HMMA']}: {top}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--sass", metavar="KERNEL", help="disassemble this kernel's loops")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    a = ap.parse_args()
    changes = dict(kv.split("=", 1) for kv in a.set)
    root = cuda_root()
    nvrtc = ctypes.CDLL(str(next((root / "cuda_nvrtc" / "lib").glob("libnvrtc.so*"))))
    ptxas = root / "cuda_nvcc" / "bin" / "ptxas"
    rows, failed = [], False
    for name, header, inputs, outputs, body, template in KERNELS:
        if a.sass and name != a.sass:
            continue
        template = {k: int(changes.get(k, v)) for k, v in template.items()}
        rc, log, ptx = compile_ptx(nvrtc, root, source(name, header, inputs, outputs, body,
                                                        template), a.arch)
        row = {"kernel": name, "compiled": rc == 0, "registers": None, "spill_bytes": None}
        if rc != 0:
            failed = True
            print(f"{name}: NVRTC error\n{log}", file=sys.stderr)
        elif ptxas.exists():
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "k.ptx").write_bytes(ptx)
                info = subprocess.run([str(ptxas), f"-arch={a.arch}", "-v", "k.ptx", "-o",
                                       "k.cubin"], cwd=d, capture_output=True, text=True).stderr
                if a.sass:
                    show_sass(Path(d) / "k.cubin", name)
            regs = re.search(r"Used (\d+) registers", info)
            spills = re.findall(r"(\d+) bytes spill", info)
            row["registers"] = int(regs.group(1)) if regs else None
            row["spill_bytes"] = sum(int(s) for s in spills)
        rows.append(row)
    print(f"{'kernel':<16} {'compiled':>8} {'registers':>9} {'spill bytes':>11}")
    for r in rows:
        print(f"{r['kernel']:<16} {str(r['compiled']):>8} {str(r['registers']):>9} "
              f"{str(r['spill_bytes']):>11}")
    print(json.dumps({"arch": a.arch, "kernels": rows}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
