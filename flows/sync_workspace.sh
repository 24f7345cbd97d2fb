#!/bin/sh
# Bring a worker's workspace to the deployed commit: a pull step of prefect.yaml.
#   sh flows/sync_workspace.sh WORKSPACE        (env: SELFCAL_GIT_REF, default main)
#
# `reset --hard` because the workspace belongs to the worker: its last run rewrote
# params.yaml (for a profile), and the code and params give way to the deployed commit.
# The workspace's own dvc.lock stays: it records the outputs this box holds. The committed
# one records another machine's; where a stage's deps match it, DVC tries only that entry's
# outputs (stage/cache.py restore), finds them in no cache here and reruns the stage, though
# its own run-cache holds it: every night re-ran the dense evaluation and the aggregate.
# A stage whose code or params changed is changed against either lock alike.
# Untracked and ignored files stay: artifacts/, .dvc/cache, .dvc/config.local, .selfcal/.
# It takes the flow's own lock (.selfcal/run.lock, flock(2)), so it never moves the code
# under a run that is still going; it fails at once, naming that run, instead.
set -eu
ws=${1:?usage: sync_workspace.sh WORKSPACE}
ref=${SELFCAL_GIT_REF:-main}
mkdir -p "$ws/.selfcal"
cd "$ws"
status=0
flock --nonblock --conflict-exit-code 75 .selfcal/run.lock \
    sh -c 'git fetch --quiet origin "$1" || exit
           kept=.selfcal/dvc.lock.kept
           rm -f "$kept"; if [ -f dvc.lock ]; then cp -p dvc.lock "$kept"; fi
           git reset --quiet --hard FETCH_HEAD || exit
           if [ -f "$kept" ]; then mv "$kept" dvc.lock; fi' sync "$ref" || status=$?
if [ "$status" -eq 75 ]; then
    holder=$(cat .selfcal/run.lock 2>/dev/null || true)
    echo "selfcal: error: workspace $(pwd) is in use by ${holder:-another process}; code not synced" >&2
fi
exit "$status"
