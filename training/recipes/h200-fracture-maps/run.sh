#!/bin/bash
# Device run (issue 11): train the three fracture-map backbones at once on one GPU, evaluate them and
# their ensemble on the validation split, bring back results + the DenseNet-121 model (+ best other).
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
BUDGET=${BUDGET:-5.5}
HARD=${HARD:-440}          # seconds after start when any training still running is stopped
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
DEV=${DEV:-cuda}; WORKERS=${WORKERS:-4}; CROPS=${CROPS:-24576}; BATCH=${BATCH:-64}; LIMIT=${LIMIT:-}
R=/tmp/runs; FA=/tmp/fa; mkdir -p $R
el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
if [ -d .gpu/whl ] && ! python3 -c "import pydicom" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, torchvision, cv2, numpy, pydicom; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'tv', torchvision.__version__, 'cv2', cv2.__version__, 'np', numpy.__version__, 'cores', __import__('os').cpu_count())"
[ -d $FA ] || python3 training/recipes/h200-fracture-maps/unpack.py $FA || exit 4
el unpacked
declare -A LR=([densenet121]=2e-3 [resnet50]=2e-3 [vgg16]=5e-4)
PIDS=()
for a in ${ARCHS:-densenet121 resnet50 vgg16}; do
  python3 -m training train-map --arch $a --data $FA --split ${SPLIT:-$FA/split.csv} --out $R/$a --scale 512 --crop 256 \
    --epochs 200 --crops-per-epoch $CROPS --batch-size $BATCH --lr ${LR[$a]} --weight-decay 0.05 --hard-pool 256 \
    --val-batch 32 --workers $WORKERS --max-minutes $BUDGET --device $DEV --threads 2 --no-progress --half --n-boot 200 \
    --checkpoint-minutes 0 --name pacs-ai-reference-$a-map --version 3.0.0 > $R/train-$a.log 2>&1 &
  PIDS+=($!)
done
( sleep $(( HARD - ($(date +%s) - T0) )); pkill -INT -f "training train-map" && echo "watchdog: stopped training at ${HARD}s" ) &
WD=$!
for p in ${PIDS[@]}; do wait $p; echo "train pid $p exit $?"; done
kill $WD 2>/dev/null
el trained
for a in densenet121 resnet50 vgg16; do tail -3 $R/train-$a.log; done
EV="--data $FA --split ${SPLIT:-$FA/split.csv} --subset val --device $DEV --threads 2 --n-boot 1000"
have=()
for a in densenet121 resnet50 vgg16; do
  if [ -f $R/$a/model-best/model.json ]; then have+=($R/$a/model-best)
    timeout 120 python3 -m training evaluate --model $R/$a/model-best $EV --json $R/eval/$a/metrics.json > $R/eval-$a.log 2>&1 &
  fi
done
[ ${#have[@]} -ge 2 ] && timeout 150 python3 -m training evaluate --model ${have[@]} $EV --json $R/eval/ensemble/metrics.json > $R/eval-ensemble.log 2>&1 &
wait
el evaluated
cat $R/eval-*.log | grep -v "^\s*$" | head -120
# results bundle (no weights) + DenseNet-121 model + the best other model if its validation AUROC is higher
tar czf $OUT/results.tgz --exclude='*.pt' --exclude='*.safetensors' -C /tmp runs 2>/dev/null
python3 - <<'PY'
import json, os, shutil, subprocess
R, OUT = "/tmp/runs", os.environ.get("OUT", "/tmp/out")
auc = {}
for a in ("densenet121", "resnet50", "vgg16"):
    try: auc[a] = json.load(open(f"{R}/eval/{a}/metrics.json"))["auc"]
    except Exception: pass
print("validation AUROC", auc)
send = ["densenet121"] if "densenet121" in auc else []
others = sorted((v, a) for a, v in auc.items() if a != "densenet121")
if others and (not send or others[-1][0] > auc["densenet121"]): send.append(others[-1][1])
for a in send:
    subprocess.run(["split", "-b", "15M", "-d", f"{R}/{a}/model-best/model.safetensors", f"{OUT}/{a}.w"], check=True)
print("sent", send)
PY
ls -la $OUT
el done
