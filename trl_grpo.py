"""
DPG's exact rewards inside TRL's GRPOTrainer: a task of dpg.py (or --phi), with its Phi, success measure and models,
trained by TRL's GRPO (the paper's per-example credit, the clipped objective, vLLM, accelerate) instead of dpg.py's
own loop. The rewards are dpg.TRLReward's; Phi and the measure before and after are taken as dpg.run takes them
(a plain inner SFT on the same fixed batch), so the two loops' summaries compare line by line.

    pip install trl==1.16.0
    python trl_grpo.py --task uuid                                   # tiny offline models, CPU
    torchrun --nproc-per-node 2 trl_grpo.py --task 67 --steps 20     # several processes: gloo on CPUs, NCCL on GPUs
    python trl_grpo.py --task qr --device cuda --bf16 --vllm --generator HuggingFaceTB/SmolLM2-135M-Instruct \\
        --target gpt2 --prompts 64 --rollouts 4                      # a GPU: vLLM (colocate) samples, bf16 trains
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import torch

import dpg

SHARED = ("task", "phi", "seed", "steps", "prompts", "rollouts", "max_new_tokens", "min_new_tokens", "temperature",
          "lr", "lr_decay", "clip", "inner_opt", "inner_lr", "inner_steps", "inner_eps", "micro_batch", "grad_accum",
          "seq_len", "lang", "data", "generator", "target", "pretrain_steps", "device", "threads", "log_every", "out")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in (f for f in dataclasses.fields(dpg.Config) if f.name in SHARED):  # as dpg.py's flags, the same defaults
        typ = {"int": int, "float": float}.get(getattr(f.type, "__name__", f.type), str)
        p.add_argument("--" + f.name.replace("_", "-"), type=typ, default=f.default, help="as in dpg.py")
    p.add_argument("--vllm", action="store_true", help="sample with vLLM in colocate mode (a GPU; --generator a hub id "
                   "or folder; pip install -r requirements-vllm.txt)")
    p.add_argument("--vllm-memory", type=float, default=0.3, help="the GPU memory share vLLM may hold in colocate mode")
    p.add_argument("--bf16", action="store_true", help="train the generator in bf16; the inner loop stays fp32")
    p.add_argument("--loss-type", default="dapo", help="GRPOTrainer's loss_type: dapo (its default), grpo, dr_grpo")
    p.add_argument("--epsilon", type=float, default=0.2, help="GRPO's clipping range of the probability ratio")
    return p, p.parse_args(argv)


def measured_reward(s, every):
    """dpg.TRLReward, which also logs the task's success measure every `every` steps after a plain inner SFT on the
    batch (as dpg.run's rows have it); its `measure_s` counts the seconds spent so, which the summary leaves out."""
    reward = dpg.TRLReward(s.target, s.ttok, s.phi, s.hp, s.L, generator_tokenizer=s.gtok)

    def dpg_reward(prompts, completions, completion_ids, log_metric=None, trainer_state=None, **kwargs):
        r = reward(prompts, completions, completion_ids, log_metric, **kwargs)
        if log_metric and trainer_state is not None and trainer_state.global_step % every == 0:
            t = time.time()
            eps = torch.ones(len(r), device=s.dev)
            w = dpg.inner_sft(reward.loss_fn(completions, completion_ids), reward.w0, eps, s.hp)
            with torch.no_grad():
                texts = dpg.all_lists([c[-1]["content"] if isinstance(c, list) else c for c in completions])
                for k, v in s.measure(w, texts).items():
                    log_metric(f"dpg/{k}", v)
            dpg_reward.measure_s += time.time() - t
        return r

    dpg_reward.__name__, dpg_reward.measure_s = reward.__name__, 0.0  # TRL names the reward's log columns after it
    return dpg_reward


def evaluate(cfg, s):
    """Phi and the measure after a plain inner SFT on the generator's samples of a fixed batch: dpg.run's before and
    after, the same seed and prompts (under torchrun each process samples its share, the inner SFT sums them)."""
    batch, loss_fn = dpg.rollout(cfg, s, 0, 1_000_003 * (cfg.seed + 1))
    w = dpg.inner_sft(loss_fn, s.w0, torch.ones(s.N, device=s.dev), s.hp)
    with torch.no_grad():
        return {"phi": s.phi(w).item(), **s.measure(w, dpg.all_lists(batch["texts"]))}


def main(argv=None):
    p, a = parse(argv)
    try:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        p.exit(2, f"{p.prog}: error: {e.name} is missing: pip install trl==1.16.0\n")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():  # torchrun: N per process
        if a.device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group("nccl" if a.device == "cuda" else "gloo")
    try:  # the paper's per-example credit; the trust region is dpg.py's, GRPO clips instead
        cfg, s = dpg.setup(dpg.Config(**{k: getattr(a, k) for k in SHARED}, credit="example", max_kl=0.0))
    except (dpg.BadInput, FileNotFoundError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    out = cfg.out or os.path.join("runs", f"{dpg.task_name(cfg, s.task)}-trl-{cfg.seed}")
    before = evaluate(cfg, s)
    args = GRPOConfig(
        output_dir=out, max_steps=cfg.steps, per_device_train_batch_size=s.N, num_generations=cfg.rollouts,
        gradient_accumulation_steps=1, steps_per_generation=1,  # one generator step per batch of N, as dpg.run
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, learning_rate=cfg.lr,
        lr_scheduler_type="linear" if cfg.lr_decay else "constant", weight_decay=0.01,  # torch's AdamW, as dpg.run
        max_grad_norm=cfg.clip, loss_type=a.loss_type, epsilon=a.epsilon, beta=0.0, seed=cfg.seed,
        generation_kwargs={"min_new_tokens": cfg.min_new_tokens} if cfg.min_new_tokens else None,
        use_cpu=cfg.device == "cpu", bf16=a.bf16, use_vllm=a.vllm, vllm_mode="colocate",
        vllm_gpu_memory_utilization=a.vllm_memory, logging_steps=cfg.log_every, save_strategy="no",
        report_to="none", disable_tqdm=True)
    reward = measured_reward(s, cfg.log_every)
    prompts = dpg.prompt_texts(s.gtok, s.passages, 0, len(s.passages))
    trainer = GRPOTrainer(model=s.gen, reward_funcs=[reward], args=args, processing_class=s.gtok,
                          train_dataset=Dataset.from_dict({"prompt": prompts}))
    t = time.time()
    trainer.train()
    seconds = time.time() - t - reward.measure_s
    s.gen = trainer.accelerator.unwrap_model(trainer.model).eval()
    after = evaluate(cfg, s)
    summary = {"task": dpg.task_name(cfg, s.task), "loop": "trl", "seed": cfg.seed, "steps": cfg.steps,
               "seconds": round(seconds, 1), "phi_before": before.pop("phi"), "phi_after": after.pop("phi")}
    summary |= {f"{k}_{when}": v for when, row in (("before", before), ("after", after)) for k, v in row.items()}
    if dpg.rank() == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary | {"config": dataclasses.asdict(cfg), "trl": vars(a)}, f, indent=1)
        print(json.dumps(summary))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    sys.exit(main() and 0)
