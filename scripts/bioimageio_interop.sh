#!/usr/bin/env bash
# Checks emparsl's bioimage.io packages with the BioImage Model Zoo's own tools, in a venv of
# their own (not part of `make test`: it downloads bioimageio.core and its dependencies).
#   bash scripts/bioimageio_interop.sh [WORKDIR]
# 1. exports the built-in model with `emparsl export-model`;
# 2. validates its rdf.yaml with bioimageio.spec (format and the files' SHA-256);
# 3. runs bioimageio.core's test_model: their runtime reproduces the package's test output
#    from its test input with the TorchScript weights, at several input sizes and batch sizes.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-/tmp/emparsl-bioimageio}"
mkdir -p "$work"
if [ ! -x "$work/venv/bin/python" ]; then
    python3 -m venv "$work/venv"
    # torch first (the CPU build on this disk); pydantic < 2.12: bioimageio.spec 0.5.12's
    # serializers fail under newer pydantic ("'index_key' is expected to be an integer")
    "$work/venv/bin/pip" install -q torch==2.13.0
    "$work/venv/bin/pip" install -q bioimageio.core "pydantic<2.12"
fi
rm -f "$work/unet3d-em.zip"
"$here/.venv/bin/emparsl" export-model unet3d-em "$work/unet3d-em.zip" \
    --name "EM membranes and mitochondria"
"$work/venv/bin/python" - "$work/unet3d-em.zip" <<'PY'
import sys

from bioimageio.core import test_model
from bioimageio.spec import load_description

path = sys.argv[1]
descr = load_description(path, perform_io_checks=True)
print(f"bioimageio.spec: {type(descr).__name__}, {descr.validation_summary.status}")
summary = test_model(path, weight_format="torchscript")
for detail in summary.details:
    print(f"  {detail.status}: {detail.name}")
print(f"bioimageio.core test_model: {summary.status}")
sys.exit(0 if summary.status == "passed" else 1)
PY
