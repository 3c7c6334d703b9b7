"What machine a benchmark ran on: the CPU model and the instruction set PyTorch's CPU kernels (oneDNN) use."
import platform


def cpu_model() -> str:
    "The CPU's model name (Linux /proc/cpuinfo; elsewhere what `platform` knows)."
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"): return line.split(":", 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    "The vector instruction set PyTorch's CPU kernels dispatch to here (e.g. AVX512, AVX2)."
    import torch
    try: return torch.backends.cpu.get_cpu_capability()
    except AttributeError: return "unknown"
