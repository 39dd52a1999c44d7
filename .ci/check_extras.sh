#!/usr/bin/env bash
# Resolve every documented extra set without installing anything (pip --dry-run), so a pin that
# makes one of the README's install lines impossible fails CI instead of a user's install.
# Usage: .ci/check_extras.sh [PYTHON]   (default: .venv/bin/python if present, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
# Keep in step with the install lines of README.md and the recipes' header comments.
SETS=(cpu,dev gpu,dev cpu,dev,trackers gpu,dev,trackers cpu,dev,trackers,trackio cpu,dev,bench cpu,dev,deepspeed)
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
failed=()
for set in "${SETS[@]}"; do
    if "$PY" -m pip install --dry-run --quiet --disable-pip-version-check ".[$set]" >"$log" 2>&1; then
        echo "extras [$set] resolve"
    else
        echo "extras [$set] do NOT resolve:"
        grep -v "is ignored" "$log" | grep -vE '^\s*$' | tail -15 | sed 's/^/    /'
        failed+=("$set")
    fi
done
if (( ${#failed[@]} )); then
    echo "unresolvable extra sets: ${failed[*]}" >&2
    exit 1
fi
