#!/usr/bin/env bash
# The installed package, not the checkout: build a wheel and an sdist, install the wheel into a fresh virtual
# environment and use it from an empty folder (shipped search spaces and study templates included).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python -m build --outdir "$work/dist" "$repo"
ls "$work/dist"/alternas-*.whl "$work/dist"/alternas-*.tar.gz
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
"$work/venv/bin/pip" install -q "$work"/dist/alternas-*.whl

cd "$work"  # nothing of the checkout is importable from here
export PATH="$work/venv/bin:$PATH"
python -c "import alternas, sys; assert alternas.__file__.startswith('$work/venv'), alternas.__file__"
alternas optuna --help >/dev/null
alternas arch CC,CM,CM,CM --base tiny --num-classes 10 --image-size 32 | tail -1
# no --space: the search space shipped for the base; one trial on the built-in data
alternas optuna --base tiny --data shapes --subset 200 --epochs 1 --trials 1 --out "$work/study" --quiet
test -f "$work/study/report.html"
# the README's main command names studies/quickstart.yaml: outside a checkout it is the shipped template
python -c "from alternas.search.study import load_study; print('template:', load_study('quickstart').name)"
echo "package check: OK"
