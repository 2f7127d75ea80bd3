# Sourced by the scripts that run on a lent GPU (gpu_session.sh, gpu_recipes.sh) once they have
# set OUT, W, BUDGET (seconds for the whole call) and KEEP (seconds kept for packing at the end):
# the session log, the clock (now, left, say), the wheels the machine lacks (from .gpu/), and
# what the machine is.
START=$(date +%s)
export XDG_CACHE_HOME=${CACHE:-/tmp/gpu-cache} PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$W"
OUT=$(cd "$OUT" && pwd)  # absolute: some steps run from inside $W
exec > >(tee -a "$OUT/session.log") 2>&1

now() { echo $(($(date +%s) - START)); }
left() { local s=$((BUDGET - KEEP - $(now))); echo $((s > 1 ? s : 1)); }
say() { echo "[$(now)s] $*"; }

say "setup"
if ls .gpu/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl &&
        export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
python3 -c "import torch, torchvision, lightning, pytorch_grad_cam; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'lightning', lightning.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
nproc
