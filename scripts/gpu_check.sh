#!/usr/bin/env bash
# The GPU check (not part of `make test`: CI has no GPU). On a machine whose python3 has a CUDA
# build of torch: the device tests, then the sample on the `local` site with `device: auto`
# (the GPU) and `device: cpu`, timed, with their Dice and how far apart their labels are.
#   bash scripts/gpu_check.sh            (OUT=folder for the outputs, default /tmp/gpu-check)
# Packages the machine lacks can wait as wheels in .whl/ (installed to /tmp/site, no network).
set -u
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
if ! $PY -c "import parsl, z5py, pydantic" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site PATH="/tmp/site/bin:$PATH"  # Parsl's interchange.py is a script
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -L || echo 'no nvidia-smi'
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.is_available() and torch.cuda.get_device_name(0))"
$PY -m pytest -q -p no:cacheprovider -s -rs tests/execution/test_devices.py \
    tests/core/test_models.py -k "devices or channels_last or layout or gpu or cuda" \
    >"$OUT/pytest.log" 2>&1
grep -E "GPU tiled|passed|failed|Error|SKIPPED" "$OUT/pytest.log" | tail -12
$PY -m napari_emparsl.cli sample "$OUT/s.n5" --shape 128,256,256 --overwrite >/dev/null
for dev in auto cpu auto cpu; do
    printf 'kind: local\nworkers: 2\ndevice: %s\n' "$dev" >"$OUT/site_$dev.yaml"
    t0=$(date +%s.%N)
    $PY -m napari_emparsl.cli run --input "$OUT/s.n5:raw" --model unet3d-em \
        --output "$OUT/s.n5:p_$dev" --site "$OUT/site_$dev.yaml" --overwrite 2>/dev/null | grep Finished
    echo "device $dev: whole command $(awk "BEGIN {print $(date +%s.%N) - $t0}") s"
done
$PY -m napari_emparsl.cli sample "$OUT/big.n5" --shape 256,512,512 --overwrite >/dev/null
for workers in 1 2; do
    printf 'kind: local\nworkers: %s\ndevice: auto\n' "$workers" >"$OUT/site_big$workers.yaml"
    $PY -m napari_emparsl.cli run --input "$OUT/big.n5:raw" --model unet3d-em --overwrite \
        --output "$OUT/big.n5:p" --site "$OUT/site_big$workers.yaml" 2>/dev/null | grep Finished
done
for dev in auto cpu; do $PY -m napari_emparsl.cli evaluate "$OUT/s.n5:p_$dev" "$OUT/s.n5:labels/classes"; done
$PY - "$OUT" <<'EOF'
import sys
from napari_emparsl.core.ledger import Ledger
from napari_emparsl.core.volume import Volume
out = sys.argv[1]
for key in ("p_auto", "p_cpu"):
    done = Ledger(f"{out}/s.n5", key).summary().done.values()
    print(key, "devices", sorted({r["device"] for r in done}),
          "mean compute s", round(sum(r["t_compute"] for r in done) / len(done), 3))
a = Volume.open(f"{out}/s.n5", "p_auto").data.compute()
b = Volume.open(f"{out}/s.n5", "p_cpu").data.compute()
print("labels differing, GPU run vs CPU run:", float((a != b).mean()))
EOF
$PY - "$OUT" <<'EOF2'
import sys, time
import numpy as np
import torch
from napari_emparsl.core.models.loaders import load_model
from napari_emparsl.core.models.training import volume_stats
from napari_emparsl.core.volume import Volume
vol = Volume.open(f"{sys.argv[1]}/s.n5", "raw")
mean, std = volume_stats(vol)
x = torch.from_numpy((vol.data.compute().astype(np.float32) - mean) / std)[None, None].cuda()
net = load_model("unet3d-em", device="cuda:0").module
times = []
for _ in range(3):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    with torch.inference_mode():
        net(x).argmax(1).cpu()
    times.append(time.perf_counter() - t0)
print("sample: whole-volume forward on the GPU (in memory, model loaded), s:", [round(t, 3) for t in times])
EOF2
