"""What a compiled GPU kernel tells without a GPU: ptxas resource use, occupancy, and fences in its loops.

Pure text / arithmetic (no triton, no torch), so every rule here is unit-tested on canned inputs:

* `parse_ptxas_log`: registers, spill bytes, stack frame from `ptxas -v` output;
* `ctas_per_sm`: resident CTAs per SM from registers, warps and shared memory (the CUDA occupancy rules);
* `sass_loops`: the loops of a SASS listing (a backward branch and its target) and the memory fences
  (`MEMBAR`, `FENCE`, `ERRBAR`, L1 invalidation `CCTL.IVALL`) and global loads inside them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


# ------------------------------------------------------------------------------------------ ptxas -v
@dataclass(frozen=True)
class PtxasStats:
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def parse_ptxas_log(log: str) -> PtxasStats:
    """Registers, spills and stack of the (single) entry function in a `ptxas -v` log; ValueError if absent."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    if not (regs and spill and stack):
        raise ValueError(f"not a ptxas -v log (no register / spill / stack lines):\n{log[:2000]}")
    return PtxasStats(int(regs.group(1)), int(spill.group(1)), int(spill.group(2)), int(stack.group(1)))


# ------------------------------------------------------------------------------------------ occupancy
@dataclass(frozen=True)
class SMLimits:
    """Per-SM resources of a compute capability (CUDA programming guide, occupancy calculator), and the
    SM count of its reference part (H100 SXM / H200: 132; A100: 108)."""
    name: str
    sms: int
    registers: int = 65536
    threads: int = 2048
    ctas: int = 32
    smem_bytes: int = 228 * 1024
    smem_per_cta_max: int = 227 * 1024
    smem_reserved_per_cta: int = 1024  # the driver's per-CTA reservation (sm_80 and later)
    smem_alloc_unit: int = 128
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256 (8 per thread)
    sub_partitions: int = 4  # each quarter of the register file serves its own warps
    max_regs_per_thread: int = 255


SM90 = SMLimits("sm_90", sms=132)
SM80 = SMLimits("sm_80", sms=108, smem_bytes=164 * 1024, smem_per_cta_max=163 * 1024)


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def ctas_per_sm(registers: int, num_warps: int, smem_bytes: int, sm: SMLimits = SM90) -> tuple[int, str]:
    """(resident CTAs per SM, the limiting resource) for a kernel using `registers` per thread, `num_warps`
    warps per CTA and `smem_bytes` of shared memory per CTA (static + dynamic); 0 if it cannot launch."""
    if num_warps < 1 or registers < 0 or smem_bytes < 0:
        raise ValueError(f"bad kernel resources: registers={registers}, num_warps={num_warps}, smem={smem_bytes}")
    if registers > sm.max_regs_per_thread or smem_bytes > sm.smem_per_cta_max or num_warps * 32 > 1024:
        return 0, "cannot launch"
    limits = {"threads": sm.threads // (32 * num_warps), "ctas": sm.ctas}
    regs_per_warp = _round_up(max(registers, 1) * 32, sm.reg_alloc_unit)
    warps_per_partition = (sm.registers // sm.sub_partitions) // regs_per_warp
    limits["registers"] = warps_per_partition * sm.sub_partitions // num_warps
    smem_per_cta = _round_up(smem_bytes + sm.smem_reserved_per_cta, sm.smem_alloc_unit)
    limits["shared memory"] = sm.smem_bytes // smem_per_cta
    limiter = min(limits, key=lambda k: (limits[k], k != "registers"))
    return limits[limiter], limiter


# ------------------------------------------------------------------------------------------ SASS
_LINE = re.compile(r"^\s*/\*([0-9a-fA-F]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"^(?:BRA|JMP)\b[\w.]*\s+(?:.*?)0x([0-9a-fA-F]+)\s*$")
# Ordering / coherence instructions: what `tl.atomic_add(..., sem="acq_rel")` (the default) and
# `tl.debug_barrier`-style code emit around memory operations.
FENCE_OPCODES = ("MEMBAR", "FENCE", "ERRBAR", "CGAERRBAR", "CCTL.IVALL")
GLOBAL_LOAD_OPCODES = ("LDG", "LDGSTS", "UTMALDG", "UBLKCP")


@dataclass
class SassLoop:
    start: int  # address of the branch target (loop head)
    end: int  # address of the backward branch
    fences: list[str] = field(default_factory=list)  # "addr opcode" of fence instructions in the body
    global_loads: int = 0


def parse_sass(text: str) -> list[tuple[int, str]]:
    """(address, instruction without predicate) for each instruction line of `cuobjdump --dump-sass`."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            ins = re.sub(r"^@!?U?P\w+\s+", "", m.group(2).strip())
            out.append((int(m.group(1), 16), ins))
    return out


def _opcode(ins: str) -> str:
    return ins.split()[0] if ins else ""


def _is_fence(op: str) -> bool:
    return any(op == f or op.startswith(f + ".") for f in FENCE_OPCODES) or op.startswith("CCTL") and "IVALL" in op


def sass_loops(text: str) -> list[SassLoop]:
    """Loops (backward branches other than the end-of-kernel self branch) with the fences and global loads
    between their head and their branch."""
    ins = parse_sass(text)
    loops = []
    for addr, i in ins:
        m = _BRANCH.match(i)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target < addr:  # backward (target == addr is the trap loop after EXIT)
            loops.append(SassLoop(target, addr))
    for loop in loops:
        for addr, i in ins:
            if loop.start <= addr <= loop.end:
                op = _opcode(i)
                if _is_fence(op):
                    loop.fences.append(f"{addr:#06x} {op}")
                if any(op == g or op.startswith(g + ".") for g in GLOBAL_LOAD_OPCODES):
                    loop.global_loads += 1
    return loops


@dataclass(frozen=True)
class LoopFences:
    count: int  # distinct fence instructions inside any loop
    kinds: tuple[str, ...]  # their opcodes, sorted
    streaming: bool  # some loop loads from global memory


def fences_in_loops(sass_text: str) -> LoopFences:
    """Summary of `sass_loops`: fence instructions inside loop bodies (each counted once) and whether the
    kernel streams (a loop that issues global loads)."""
    loops = sass_loops(sass_text)
    fences = sorted({f for loop in loops for f in loop.fences})
    kinds = tuple(sorted({f.split()[1] for f in fences}))
    return LoopFences(len(fences), kinds, any(loop.global_loads for loop in loops))
