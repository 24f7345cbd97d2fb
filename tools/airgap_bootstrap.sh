#!/bin/sh
# On an air-gapped box: join the split files, install the bundled wheels, check they import.
#   sh tools/airgap_bootstrap.sh BUNDLE_DIR SITE_DIR      then: export PYTHONPATH=SITE_DIR
# BUNDLE_DIR holds wheels/*.whl and, optionally, parts/ (with parts.json, from `airgap.py split`).
# AIRGAP_IMPORTS: the modules to import as the check (default: the evaluation stage's).
set -eu
bundle=${1:?usage: airgap_bootstrap.sh BUNDLE_DIR SITE_DIR}
site=${2:?usage: airgap_bootstrap.sh BUNDLE_DIR SITE_DIR}
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
if [ -f "$bundle/transfers.json" ]; then  # a pack's transfers: all of them, before anything is installed
    "$py" "$here/airgap.py" check "$bundle"
fi
if [ -f "$bundle/parts/parts.json" ]; then
    "$py" "$here/airgap.py" join "$bundle/parts" --out "$bundle/files"
fi
if ls "$bundle"/wheels/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$bundle"/wheels/*.whl
fi
AIRGAP_IMPORTS=${AIRGAP_IMPORTS:-lm_eval datasets pydantic torch transformers} \
PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$py" - <<'PY'
import importlib, importlib.metadata as md, os
for name in os.environ["AIRGAP_IMPORTS"].split():
    try:
        importlib.import_module(name)
        print(f"airgap: {name} {md.version(name.replace('_', '-'))} imports")
    except Exception as err:  # say which one, then stop
        raise SystemExit(f"airgap: {name} does not import: {err}")
PY
