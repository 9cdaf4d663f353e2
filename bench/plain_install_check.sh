#!/usr/bin/env bash
# A plain `pip install` in a fresh venv (torch, then the package: no extras, no dev tools), then a tiny
# finetune -> generate -> export, failing on any traceback or warning; then the suite from that venv
# (tests needing transformers/peft skip). Catches an undeclared dependency before a user does.
#   bash bench/plain_install_check.sh            (CI: .ci/run)
#   VENV=/tmp/x SUITE=0 bash bench/plain_install_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
VENV=${VENV:-$work/venv}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}
PY=${PY:-python3}

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q "$TORCH_PIN"
"$VENV/bin/pip" install -q "$repo" pytest

# run a command in the scratch directory (never the checkout: the installed package must be the one used);
# fail on a non-zero exit, a traceback or a warning anywhere in its output
check() {
    local log="$work/log"
    if ! (cd "$work" && PYTHONWARNINGS=default "$@") >"$log" 2>&1; then
        cat "$log"; echo "plain install check: FAILED (exit): $*" >&2; exit 1
    fi
    if grep -Eiq 'traceback|warning' "$log"; then
        cat "$log"; echo "plain install check: FAILED (traceback or warning): $*" >&2; exit 1
    fi
}

"$VENV/bin/python" - "$work/data.jsonl" <<'PY'
import json, sys
words = "apple river stone garden lemon tiger cloud paper".split()
with open(sys.argv[1], "w") as f:
    for i in range(48):
        w = [words[(i + k) % len(words)] for k in range(3)]
        f.write(json.dumps({"instruction": "Reverse these words.", "input": " ".join(w),
                            "output": " ".join(reversed(w))}) + "\n")
PY
mft="$VENV/bin/microft"
check "$mft" finetune --model gpt2-tiny --data data.jsonl --max-steps 4 --micro-bs 2 --accum 2 --out run \
    --log-format plain
test -f "$work/run/final/model.safetensors" || { echo "no weights written" >&2; ls -R "$work/run"; exit 1; }
check "$mft" generate --model run/final --prompt "Reverse these words." --max-new-tokens 8
check "$mft" export --model run/final --out hf
test -f "$work/hf/config.json" || { echo "export wrote no config.json" >&2; exit 1; }
echo "plain install: finetune -> generate -> export clean"

if [ "${SUITE:-1}" = 1 ]; then
    # the suite against the installed package and its declared dependencies only
    # a copy of the checkout without the package: tests and bench import the installed microft
    (cd "$repo" && git ls-files -z | grep -zv '^microft/' | xargs -0 cp --parents -t "$work")
    (cd "$work" && "$VENV/bin/python" -m pytest -q -x -p no:cacheprovider tests)
fi
