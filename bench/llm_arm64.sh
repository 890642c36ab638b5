#!/usr/bin/env bash
# bench/llm.py's agent side (bench/llm_agent.py: a real agent process serving the chosen SmolLM2
# artifact vs the same model in process) inside .ci/arm64's emulated Raspberry Pi 4 rootfs.
# EMULATED: qemu-user runs the aarch64 code several times slower than a Pi and RSS includes the
# translator; only the side-by-side ratio means something.
#   bash .ci/arm64                       # once: builds the rootfs and its agent venv (cached)
#   python3 bench/llm.py                 # once: builds the artifact into .edgefleet-cache
#   bash bench/llm_arm64.sh [ROUNDS] [TOKENS]     # as root; default 2 rounds of 16 tokens
# A copy of the rootfs venv gets onnxruntime-genai's aarch64 wheel (/opt/venv-llm), so the CI
# job's venv is left as it is. Last line: one JSON object (bench/llm_agent.py's figures).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${EDGEFLEET_ARM64_CACHE:-/var/cache/edgefleet-arm64}; ROOTFS=$CACHE/rootfs
[ -x "$ROOTFS/opt/venv/bin/python" ] || { echo "no agent venv in $ROOTFS: run bash .ci/arm64 first" >&2; exit 1; }
ls "$REPO"/.edgefleet-cache/bench-llm/*.efa >/dev/null 2>&1 || { echo "no artifact: run python3 bench/llm.py first" >&2; exit 1; }
if [ ! -x "$ROOTFS/opt/venv-llm/bin/python" ]; then cp -a "$ROOTFS/opt/venv" "$ROOTFS/opt/venv-llm"; fi
rm -rf "$ROOTFS/src-llm" "$ROOTFS/llm"; mkdir -p "$ROOTFS/src-llm" "$ROOTFS/llm"
(cd "$REPO" && git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -C "$ROOTFS/src-llm" -xf -)
cp -a "$REPO"/.edgefleet-cache/llm/*/genai-int8 "$ROOTFS/llm/genai-int8"
cp "$REPO"/.edgefleet-cache/bench-llm/smollm2-1.0.0-x86-ipc.efa "$ROOTFS/llm/a.efa"
cp "$REPO"/.edgefleet-cache/bench-llm/keys/edgefleet.pub "$ROOTFS/llm/edgefleet.pub"
cat > "$ROOTFS/llm/drive.py" <<'EOF'
import json, sys, platform
from pathlib import Path
sys.path.insert(0, "/src-llm"); sys.path.append("/src-llm/bench")
from llm_agent import side_by_side
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 16
print("machine", platform.machine(), platform.python_version(), flush=True)
out = side_by_side(Path("/llm/a.efa"), Path("/llm/edgefleet.pub"), Path("/llm/genai-int8"), 2,
                   "What is the capital of France?", tokens, rounds, lambda m: print(m, flush=True))
print(json.dumps(out), flush=True)
EOF
ROUNDS=${1:-2} TOKENS=${2:-16}
inside=$(cat <<'SCRIPT'
/opt/venv-llm/bin/python -c "import onnxruntime_genai" 2>/dev/null \
  || /opt/venv-llm/bin/python -m pip install -q --disable-pip-version-check --only-binary=:all: onnxruntime-genai==0.18.0
/opt/venv-llm/bin/python -c "import onnxruntime_genai as og; print('onnxruntime-genai', og.__version__)"
cd /src-llm && PYTHONPATH=/src-llm /opt/venv-llm/bin/python /llm/drive.py "$ROUNDS" "$TOKENS"
SCRIPT
)
EDGEFLEET_ARM64_CACHE=$CACHE bash "$REPO/.ci/arm64-chroot" ROUNDS="$ROUNDS" TOKENS="$TOKENS" -- \
  /bin/bash -euo pipefail -c "$inside"
