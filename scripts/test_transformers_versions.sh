#!/usr/bin/env bash
# Run lmtune's core tests against other transformers releases: by default the floor pyproject.toml
# allows (5.0.0) and the newest on PyPI, so an upgrade that renames a private Trainer method lmtune
# overrides (lmtune/train/trainer.py PRIVATE_HOOKS) or changes a behaviour the core relies on shows
# up here before users see it.
#
#   scripts/test_transformers_versions.sh                 # 5.0.0 and the newest release
#   scripts/test_transformers_versions.sh 5.3.0 newest    # any list; "newest" = pip's latest
#
# Each version gets its own virtual environment on top of this Python's packages
# (--system-site-packages), so torch, peft and datasets stay as installed: torch is pinned to the
# installed build, never upgraded. Exit status: non-zero if any version fails.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
# LMTUNE_CORE_TESTS="tests/a.py tests/b.py" runs others.
read -r -a CORE_TESTS <<< "${LMTUNE_CORE_TESTS:-tests/test_trainer_private_hooks.py tests/test_trainer_overrides.py \
tests/test_loss.py tests/test_packing.py tests/test_eval_during_training.py tests/test_finetune_e2e.py tests/test_resume.py}"
versions=("$@")
[ ${#versions[@]} -eq 0 ] && versions=(5.0.0 newest)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "torch==$($PYTHON -c 'import torch; print(torch.__version__)')" > "$work/constraints.txt"
failed=()
for version in "${versions[@]}"; do
    env="$work/venv-$version"
    "$PYTHON" -m venv --system-site-packages "$env" || exit 1
    spec="transformers==$version"
    [ "$version" = newest ] && spec="transformers"
    "$env/bin/python" -m pip install -q --upgrade -c "$work/constraints.txt" "$spec" || { failed+=("$version (install)"); continue; }
    installed=$("$env/bin/python" -c 'import transformers; print(transformers.__version__)')
    echo "== transformers $installed =="
    PYTHONPATH="$PWD" "$env/bin/python" -m pytest -q "${CORE_TESTS[@]}" || failed+=("$installed")
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "core tests failed with transformers: ${failed[*]}" >&2
    exit 1
fi
echo "core tests passed with transformers: ${versions[*]}"
