"""The benchmarks of dpg.py: costs as ratios measured in one run, on this machine. Nothing here is asserted
(test_dpg.py compares every number with an oracle); README "Tests and benchmarks" has the figures.

    python bench.py rewards     # exact rewards against plain inner SFT: time and memory (~5 min on 2 cores)
    python bench.py memory      # one SmolLM2 generator step at N = 8, 32 and 128: its parts and peak memory (~15 min)
"""
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

from dpg import (UUID, Inner, BadInput, encode_for_target, inner_sft, lm_head, lm_phi, load_model, one_step, pattern,
                 pattern_phi, reverse_sweep, sequence_losses, tiny_lm, unroll, untie_head)


def rewards(seq_len=64, micro_batch=8):
    """Cost of exact rewards against plain inner SFT, as ratios measured in this run: each case in a forked child,
    so that its peak RSS is its own (Linux). Prints a markdown table; asserts nothing."""
    import multiprocessing as mp
    import resource

    def child(fn, q):
        rss0 = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        t0 = time.perf_counter()
        fn()
        q.put((time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0))

    def measure(fn, repeat=2):  # (seconds, extra peak MB), best of `repeat`; nan if the child died (out of memory)
        ctx, runs = mp.get_context("fork"), []
        for _ in range(repeat):
            q = ctx.Queue()
            (p := ctx.Process(target=child, args=(fn, q))).start()
            p.join()
            runs.append(q.get() if p.exitcode == 0 else (math.nan, math.nan))
        return min(r[0] for r in runs), min(r[1] for r in runs)

    def row(name, M, N, loss_fn, w0, phi, hp, repeat=2):  # plain SFT, then each way to the exact rewards
        plain, cells = measure(lambda: inner_sft(loss_fn, w0, torch.ones(N), hp), repeat), [] if M == 1 else ["-"]
        for mode in ((one_step,) if M == 1 else ()) + (unroll, reverse_sweep):  # one_step: M = 1 only
            t, m = measure(lambda: mode(loss_fn, w0, torch.ones(N, requires_grad=True), phi, hp), repeat)
            cells.append(f"{t / plain[0]:.2f}, {m / plain[1]:.2f}")
        print(f"| {name} | {M} | {N} | {plain[0]:.3g} | {plain[1]:.0f} | " + " | ".join(cells) + " |", flush=True)

    torch.set_num_threads(1)  # forked children deadlock in an OpenMP pool started before the fork
    print("| target | M | N | plain SFT s | plain SFT MB | one step / plain: time, mem | unroll / plain "
          "| sweep / plain |")
    print("|---|---|---|---|---|---|---|---|")
    # forward mode's first call in a process costs ~1 s: paid once here, before the cases fork, not in each of them
    tiny, ids = tiny_lm("llama", 257, 32, 2, 0), torch.zeros(2, 9, dtype=torch.long)
    one_step(lambda w, idx: sequence_losses(tiny, w, ids[idx], torch.ones_like(ids[idx])),
             dict(tiny.named_parameters()),
             torch.ones(2, requires_grad=True),
             lambda w: sum(x.square().sum() for x in w.values()),
             Inner(micro_batch=2))
    for name, d, layers in (("tiny d=32 L=2", 32, 2), ("small d=256 L=4", 256, 4)):
        target = untie_head(tiny_lm("llama", 257, d, layers, 0))
        w0 = {k: p.detach() for k, p in target.named_parameters()}
        S = pattern("67")
        phi = lambda w: pattern_phi(lm_head(w), lm_head(w0), S)
        for M in (1, 2, 4, 8):
            N = micro_batch * M
            ids = torch.randint(0, 256, (N, seq_len + 1), generator=torch.Generator().manual_seed(M))
            mask = torch.ones_like(ids)
            loss_fn = lambda w, idx: sequence_losses(target, w, ids[idx], mask[idx])
            row(name, M, N, loss_fn, w0, phi, Inner(lr=1e-3, micro_batch=micro_batch))
    # a real model as target: SmolLM2-135M-Instruct, 16 examples x 64 tokens, M = 1 step of K = 2 microbatches of 8
    try:
        target, tok = load_model("smollm2")
    except BadInput as e:
        print(f"(no SmolLM2-135M row: {e})")
    else:
        w0 = {k: p.detach() for k, p in target.named_parameters()}
        ids = torch.randint(0, len(tok), (16, seq_len + 1), generator=torch.Generator().manual_seed(0))
        u_ids, u_mask = encode_for_target(tok, [UUID], 24)
        loss_fn = lambda w, idx: sequence_losses(target, w, ids[idx], torch.ones_like(ids[idx]))
        phi = lambda w: lm_phi(target, w, u_ids, u_mask)  # Phi: the UUID
        hp = Inner(lr=1e-6, micro_batch=micro_batch, grad_accum=2)
        row("SmolLM2-135M (K=2)", 1, 16, loss_fn, w0, phi, hp, repeat=1)


def memory(sizes=(8, 32, 128), micro_batch=8, device="cpu"):
    """One DPG step of the language task with SmolLM2-135M-Instruct as generator and target (32 new tokens), at each
    N = P x 4 in `sizes` with the inner microbatch B = 8 (K = N / B) and the update's chunk B: the step's parts and
    the process's peak memory (dpg.py's own step row), each size in a fresh process. Prints a markdown table."""
    dpg_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dpg.py")
    print("| N | B x K | sampling s | rewards s | measure s | update s | peak memory MB | peak / peak at the first N |")
    print("|---|---|---|---|---|---|---|---|")
    first = None
    for N in sizes:
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, dpg_py, "--task", "language", "--generator", "smollm2", "--target", "smollm2",
                   "--steps", "1", "--max-new-tokens", "32", "--seq-len", "32", "--prompts", str(N // 4),
                   "--rollouts", "4", "--grad-accum", str(N // micro_batch), "--device", device, "--out", out]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(f"(N = {N} failed: {proc.stderr.strip().splitlines()[-1]})")
                return
            row = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
        peak = row.get("cuda_peak_mb", row.get("rss_peak_mb"))
        first = first or peak
        parts = " | ".join(f"{row[k + '_s']:.1f}" for k in ("sample", "rewards", "measure", "update"))
        print(f"| {N} | {micro_batch} x {N // micro_batch} | {parts} | {peak:.0f} | {peak / first:.2f} |", flush=True)


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else ""
    if which not in ("rewards", "memory"):
        sys.exit("usage: python bench.py rewards | memory [cuda]")
    rewards() if which == "rewards" else memory(device=sys.argv[2] if len(sys.argv) > 2 else "cpu")
